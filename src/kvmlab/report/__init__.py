"""report: the lab on one self-contained HTML page (`invoke report`, `lab --report`).

``gather`` reads what the steps recorded (the lab lock, the run's timeline, build manifests,
every boot-test run, the checks, the doctor), ``plots`` draws them as inline SVG (pygal, the
``report`` extra), ``page`` writes the HTML: every style inline, no script, no network.
"""

"""checks: the testinfra checks of each step (test_<step>.py), run by verify and tasks."""

from pathlib import Path

import pytest

from kvmlab.core.errors import RecipeError
from kvmlab.model.recipe import load_recipe

GOOD = '''
name = "demo"
version = "1.0"
[source]
file = "demo-1.0.tar.gz"
urls = ["http://127.0.0.1:1/demo-1.0.tar.gz"]
sha256 = "unknown"
[build]
configure = ["./configure", "--prefix=/usr/local", "--enable-x"]
[builders.debian12]
series = "series"
configure_add = ["--disable-vnc-tls"]
configure_drop = ["--enable-x"]
[artifacts]
binaries = ["demo"]
'''


def write(tmp_path: Path, text: str, name: str = "demo") -> Path:
    d = tmp_path / "recipes"
    d.mkdir(exist_ok=True)
    p = d / f"{name}.toml"
    p.write_text(text)
    return d


def test_shipped_recipes_load():
    repo = Path(__file__).resolve().parents[2]
    for p in (repo / "recipes").glob("*.toml"):
        r = load_recipe(repo / "recipes", p.stem)
        assert r.name == p.stem


def test_configure_args_per_builder(tmp_path):
    r = load_recipe(write(tmp_path, GOOD), "demo")
    assert r.configure_args("debian12") == ["./configure", "--prefix=/usr/local",
                                            "--disable-vnc-tls"]
    assert not r.source.pinned


@pytest.mark.parametrize("text,needle", [
    (GOOD.replace('version = "1.0"\n', ''), "missing key 'version'"),
    (GOOD.replace('sha256 = "unknown"', 'sha256 = "abc"'), "source.sha256"),
    (GOOD.replace('urls = [', 'urls = 3\nx = ['), "source.urls"),
    (GOOD + "\n[bogus]\na=1\n", "unknown table [bogus]"),
    (GOOD.replace("[builders.debian12]", "[builders.plan9]"), "unknown builder"),
    (GOOD.replace('name = "demo"', 'name = "demo"\nnmae = "x"'), "unknown key 'nmae'"),
])
def test_bad_recipes_name_file_and_key(tmp_path, text, needle):
    d = write(tmp_path, text)
    with pytest.raises(RecipeError) as e:
        load_recipe(d, "demo")
    assert needle in e.value.message
    assert "demo.toml" in e.value.message


def test_toml_syntax_error_has_line_and_column(tmp_path):
    d = write(tmp_path, GOOD.replace('version = "1.0"', 'version = "1.0'))
    with pytest.raises(RecipeError) as e:
        load_recipe(d, "demo")
    assert "line 3" in e.value.message and "column" in e.value.message


def test_unknown_recipe_lists_known(tmp_path):
    d = write(tmp_path, GOOD)
    with pytest.raises(RecipeError) as e:
        load_recipe(d, "nope")
    assert "unknown recipe 'nope'" in e.value.message and "demo" in e.value.hint


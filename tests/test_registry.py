"""The one Registry type: built-ins, code, entry points and spec strings; one-line errors."""
import sys

import pytest

from conceptmon.registry import Registry, RegistryError, did_you_mean, import_spec, is_spec


def make(**kw):
    return Registry("widget", group="conceptmon.test_widgets", field="widget.name",
                    builtins={"json-loads": "json:loads"}, **kw)


def test_builtin_loaded_lazily_and_listed_first():
    reg = make()
    reg.register("zeta")(len)
    assert reg.names() == ["json-loads", "zeta"]
    import json

    assert reg.get("json-loads") is json.loads
    sources = {e.name: e.source for e in reg.entries()}
    assert sources["json-loads"] == "builtin"
    assert sources["zeta"].startswith("code")


def test_unknown_name_names_close_matches_and_choices():
    reg = make()
    with pytest.raises(RegistryError, match=r"widget\.name: unknown widget 'json-load' \(did you mean json-loads\?\); choices: json-loads"):
        reg.get("json-load")


def test_spec_string_imports_from_the_search_folder(tmp_path):
    (tmp_path / "my_widgets_mod.py").write_text("def fancy():\n    return 42\n")
    reg = make()
    try:
        assert reg.get("my_widgets_mod:fancy", search=[tmp_path])() == 42
    finally:
        sys.modules.pop("my_widgets_mod", None)
    assert str(tmp_path) not in sys.path  # the search folder is not left behind


def test_spec_errors_are_one_line(tmp_path):
    with pytest.raises(RegistryError, match=r"^widget\.name: cannot import 'no_such_mod_xyz': no such module"):
        import_spec("no_such_mod_xyz:f", field="widget.name", search=[tmp_path])
    with pytest.raises(RegistryError, match=r"json has no .loadz. \(did you mean load, loads\?\)"):
        import_spec("json:loadz", field="widget.name")


def test_entry_points_are_found(tmp_path, monkeypatch):
    dist = tmp_path / "widgetplug-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: widgetplug\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[conceptmon.test_widgets]\nplugged = widgetplug_mod:thing\n")
    (tmp_path / "widgetplug_mod.py").write_text("thing = 'from a plugin'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = make()
    assert reg.get("plugged") == "from a plugin"
    entry = [e for e in reg.entries() if e.name == "plugged"][0]
    assert entry.source == "entry point widgetplug (widgetplug_mod:thing)"
    sys.modules.pop("widgetplug_mod", None)


def test_check_rejects_wrong_kinds():
    def must_be_callable(name, obj):
        if not callable(obj):
            raise RegistryError(f"widget.name: {name} is not callable")

    reg = make(check=must_be_callable)
    with pytest.raises(RegistryError, match="not callable"):
        reg.register("bad")(3)


def test_helpers():
    assert is_spec("pkg.mod:Name") and is_spec("mod:f")
    assert not is_spec("clip:openai/clip-vit") and not is_spec("plain") and not is_spec("/a/b:c")
    assert did_you_mean("netdisect", ["netdissect", "pca"]) == " (did you mean netdissect?)"
    assert did_you_mean("zzz", ["netdissect"]) == ""

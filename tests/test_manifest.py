"""Tests for reading and validating IPA module manifests."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipad.config.manifest import Manifest, ModuleSource, PipelineSupport, load_manifest
from ipad.config.problems import ManifestError, Problem

from .helpers_fs import make_dir, write_file, write_manifest


def _problems(path: Path) -> list[Problem]:
    """Load ``path`` expecting it to be refused, and return the problems."""
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    return list(info.value.problems)


def _keyed(path: Path) -> list[tuple[str, str, str | None]]:
    """Load ``path`` expecting it to be refused; return (key, message, expected) per problem."""
    problems = _problems(path)
    assert {p.file for p in problems} == {path}
    return [(p.key, p.message, p.expected) for p in problems]


def test_valid_manifest_is_loaded(tmp_path: Path) -> None:
    """Every field of a valid manifest arrives typed as written."""
    manifest = load_manifest(write_manifest(tmp_path))
    assert manifest == Manifest(
        name="awb",
        version="1.0.0",
        api_version=1,
        worker="ipad-worker",
        pipeline=PipelineSupport(handlers=("simple", "rkisp1"), min_version=1, max_version=3),
        entry_point="ipa_modules.awb:GrayWorldAwb",
        description="Grey-world auto white balance",
    )


def test_optional_fields_default(tmp_path: Path) -> None:
    """A manifest without entry_point or description is valid and gets the defaults."""
    manifest = load_manifest(write_manifest(tmp_path, entry_point=None, description=None))
    assert manifest.entry_point is None
    assert manifest.description == ""


def test_module_source_directory_is_the_manifest_directory(tmp_path: Path) -> None:
    """A ModuleSource's directory is where its manifest file lies."""
    path = write_manifest(tmp_path)
    assert ModuleSource(load_manifest(path), path).directory == tmp_path


def test_malformed_toml_is_a_file_problem(tmp_path: Path) -> None:
    """A file that is not TOML is reported against "(file)" with the parser's location."""
    path = write_file(tmp_path / "awb.toml", 'name = "awb"\nversion = \n')
    [(key, message, _)] = _keyed(path)
    assert key == "(file)"
    assert message.startswith("malformed TOML: ")
    assert "line 2" in message


def test_non_utf8_file_is_a_file_problem(tmp_path: Path) -> None:
    """A file that is not UTF-8 is reported against "(file)"."""
    path = tmp_path / "awb.toml"
    path.write_bytes(b'name = "\xff"\n')
    [(key, message, _)] = _keyed(path)
    assert (key, message.split(":")[0]) == ("(file)", "not valid UTF-8")


def test_unreadable_file_is_a_file_problem(tmp_path: Path) -> None:
    """A path that cannot be read as a file is reported against "(file)"."""
    path = make_dir(tmp_path / "awb.toml")
    assert _keyed(path) == [("(file)", "cannot read: Is a directory", None)]


def test_unknown_key_gets_a_suggestion(tmp_path: Path) -> None:
    """A misspelt key is refused with the key it probably meant."""
    path = write_manifest(tmp_path, entrypoint="a:B")
    assert _keyed(path) == [("entrypoint", "unknown key", "did you mean 'entry_point'?")]


def test_unknown_key_in_pipeline_table_is_located(tmp_path: Path) -> None:
    """An unknown key inside [pipeline] is named with its dotted path."""
    pipeline = {"handlers": ["simple"], "min_version": 1, "max_version": 1, "max_verison": 2}
    path = write_manifest(tmp_path, pipeline=pipeline)
    assert _keyed(path) == [("pipeline.max_verison", "unknown key", "did you mean 'max_version'?")]


def test_missing_field_is_reported(tmp_path: Path) -> None:
    """A required key left out is reported as missing."""
    path = write_manifest(tmp_path, worker=None)
    assert _keyed(path) == [("worker", "missing required key", None)]


def test_wrong_type_is_reported(tmp_path: Path) -> None:
    """A value of the wrong TOML type is reported with what was expected."""
    path = write_manifest(tmp_path, api_version="1")
    assert _keyed(path) == [("api_version", "got a string '1'", "an integer")]


def test_unknown_api_version_is_refused(tmp_path: Path) -> None:
    """A manifest for a format this ipad does not know is refused."""
    path = write_manifest(tmp_path, api_version=2)
    assert _keyed(path) == [("api_version", "unsupported api_version 2", "one of: 1")]


@pytest.mark.parametrize("version", ["1.0", "1.0.0-rc1", "v1.0.0", "1.0.0\n", "1.٣.0", ""])
def test_malformed_version_is_refused(tmp_path: Path, version: str) -> None:
    """A version that is not three dot-separated ASCII numbers is refused."""
    path = write_manifest(tmp_path, version=version)
    assert _keyed(path) == [
        ("version", f"malformed version {version!r}", 'MAJOR.MINOR.PATCH, e.g. "1.0.0"')
    ]


def test_name_must_match_the_file_name(tmp_path: Path) -> None:
    """A manifest whose name differs from its file's stem is refused."""
    path = write_manifest(tmp_path, name="agc", file_stem="awb")
    [(key, message, _)] = _keyed(path)
    assert (key, message) == ("name", "name 'agc' differs from the file name 'awb.toml'")


def test_module_name_must_be_safe_for_paths_and_variables(tmp_path: Path) -> None:
    """A module name that could not name a tuning directory is refused, even if it matches."""
    path = write_manifest(tmp_path, name="..", file_stem="..")
    [(key, message, _)] = _keyed(path)
    assert (key, message) == ("name", "invalid module name '..'")


@pytest.mark.parametrize("worker", ["bin/ipad-worker", "/usr/bin/ipad-worker", "..", ""])
def test_worker_must_be_a_plain_file_name(tmp_path: Path, worker: str) -> None:
    """A worker that is a path, not a name, is refused."""
    path = write_manifest(tmp_path, worker=worker)
    [(key, message, _)] = _keyed(path)
    assert (key, message) == ("worker", f"worker {worker!r} is not a plain file name")


@pytest.mark.parametrize(
    "entry_point",
    ["ipa_modules.awb", "ipa_modules.awb:", ":Cls", "a..b:C", "1a:C", "a:C.D", "a:C\n"],
)
def test_bad_entry_point_is_refused(tmp_path: Path, entry_point: str) -> None:
    """An entry point not of the form package.module:Class is refused."""
    path = write_manifest(tmp_path, entry_point=entry_point)
    assert _keyed(path) == [
        ("entry_point", f"malformed entry point {entry_point!r}", '"package.module:Class"')
    ]


def test_min_version_above_max_version_is_refused(tmp_path: Path) -> None:
    """An empty pipeline version range is refused."""
    pipeline = {"handlers": ["simple"], "min_version": 3, "max_version": 1}
    path = write_manifest(tmp_path, pipeline=pipeline)
    assert _keyed(path) == [
        (
            "pipeline.min_version",
            "min_version 3 is greater than max_version 1",
            "min_version <= max_version",
        )
    ]


def test_negative_pipeline_version_is_refused(tmp_path: Path) -> None:
    """Pipeline versions start at 0."""
    pipeline = {"handlers": ["simple"], "min_version": -1, "max_version": 1}
    path = write_manifest(tmp_path, pipeline=pipeline)
    assert _keyed(path) == [("pipeline.min_version", "negative version -1", "an integer >= 0")]


def test_handlers_must_be_a_non_empty_list_of_names(tmp_path: Path) -> None:
    """An empty handler list and an empty handler name are both refused."""
    path = write_manifest(tmp_path, pipeline={"handlers": [], "min_version": 0, "max_version": 0})
    assert [k for k, _, _ in _keyed(path)] == ["pipeline.handlers"]
    pipeline = {"handlers": ["simple", ""], "min_version": 0, "max_version": 0}
    path = write_manifest(tmp_path, pipeline=pipeline)
    assert [k for k, _, _ in _keyed(path)] == ["pipeline.handlers[1]"]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    """Type errors, unknown keys and meaning errors in one file all come back together."""
    pipeline = {"handlers": "simple", "min_version": 3, "max_version": 1}
    path = write_manifest(
        tmp_path, api_version=2, version="one", worker="a/b", colour="red", pipeline=pipeline
    )
    keys = {key for key, _, _ in _keyed(path)}
    assert keys == {
        "api_version",
        "version",
        "worker",
        "colour",
        "pipeline.handlers",
        "pipeline.min_version",
    }


def test_problems_render_with_file_and_key(tmp_path: Path) -> None:
    """The error's text names the file and key of each problem, one per line."""
    path = write_manifest(tmp_path, api_version=2)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert str(info.value) == f"{path}: api_version: unsupported api_version 2 (one of: 1)"


@pytest.mark.parametrize(
    ("handler", "version", "expected"),
    [
        ("simple", 1, True),
        ("simple", 3, True),
        ("rkisp1", 2, True),
        ("simple", 0, False),
        ("simple", 4, False),
        ("ipu3", 2, False),
    ],
)
def test_pipeline_support_is_handler_and_inclusive_range(
    handler: str, version: int, expected: bool
) -> None:
    """A module supports a listed handler at any version within min..max, bounds included."""
    support = PipelineSupport(handlers=("simple", "rkisp1"), min_version=1, max_version=3)
    assert support.supports(handler, version) is expected

"""The mutation runner's own logic (ops.mutate): the equivalent list, mutant descriptions, the sample.

Running mutmut itself is ``python -m ops.mutate`` (minutes); these check the parts that decide what
a run reports and whether ``--check`` fails.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ops import mutate
from ops.mutate import EQUIVALENT_FILE, TARGETS, Mutant, choose, describe, load_equivalents, resolve

ROOT = Path(__file__).resolve().parents[2]


def test_the_equivalent_list_parses_and_names_only_mapped_modules_and_functions() -> None:
    entries = load_equivalents(EQUIVALENT_FILE)
    assert entries, "the list is read from docs/mutants-equivalent.txt"
    paths = {t.path: t for t in TARGETS}
    for e in entries:
        assert e.path in paths, e
        assert e.before and e.after and e.why, e
        target = paths[e.path]
        assert not target.functions or e.function in target.functions, e
        source = (ROOT / e.path).read_text()
        for line in e.before:
            assert line in source, f"{e.path} {e.function}: {line!r} is no longer in the code"


def test_every_mapped_module_and_test_file_exists() -> None:
    for t in TARGETS:
        assert (ROOT / t.path).is_file(), t.path
        for test in t.tests:
            assert (ROOT / test).is_file(), test


def test_an_entry_needs_its_lines_and_a_reason(tmp_path: Path) -> None:
    path = tmp_path / "eq.txt"
    path.write_text("ingestor/sequencer.py Sequencer.seed\n- a\n+ b\n")
    needs = "eq.txt:1: an entry needs its changed lines and a 'why:' reason"
    with pytest.raises(mutate.UsageError, match=re.escape(needs)):
        load_equivalents(path)
    path.write_text("# c\n\ningestor/sequencer.py Sequencer.seed\n- a\n+ b\nwhy: one\n  two\n\n\nx.py f\n+ c\nwhy: r\n")
    first, second = load_equivalents(path)
    assert first.key == ("ingestor/sequencer.py", "Sequencer.seed", ("a",), ("b",)) and first.why == "one two"
    assert second.key == ("x.py", "f", (), ("c",))
    path.write_text("ingestor/sequencer.py\n- a\nwhy: r\n")
    with pytest.raises(mutate.UsageError, match=re.escape("eq.txt:1: expected 'module/path.py function'")):
        load_equivalents(path)
    path.write_text("ingestor/sequencer.py f\n- a\n* b\nwhy: r\n")
    with pytest.raises(mutate.UsageError, match=re.escape("eq.txt:3: expected '- line'")):
        load_equivalents(path)
    assert load_equivalents(tmp_path / "missing.txt") == []


def test_describe_keeps_the_changed_lines_without_their_indent() -> None:
    diff = (
        "--- ingestor/sequencer.py\n+++ ingestor/sequencer.py\n@@ -1,3 +1,3 @@\n"
        "     ident = (venue, symbol, channel)\n-    if a > b:\n+    if a >= b:\n         pass\n"
    )
    assert describe(diff) == (("if a > b:",), ("if a >= b:",))
    assert describe("") == ((), ())


def test_mutant_names_give_the_function() -> None:
    seq = next(t for t in TARGETS if t.path == "ingestor/sequencer.py")
    frames = next(t for t in TARGETS if t.path == "ingestor/wsframes.py")
    assert Mutant("ingestor.sequencer.xǁSequencerǁseed__mutmut_13", seq).function == "Sequencer.seed"
    assert Mutant("ingestor.sequencer.xǁSequencerǁ__init____mutmut_1", seq).function == "Sequencer.__init__"
    assert Mutant("ingestor.wsframes.x_read_frames__mutmut_48", frames).function == "read_frames"
    assert Mutant("ingestor.wsframes.x__private__mutmut_2", frames).function == "_private"


def test_the_sample_takes_changed_modules_first_and_depends_only_on_the_seed() -> None:
    a, b = TARGETS[0], TARGETS[1]
    mutants = [Mutant(f"{a.module}.x_f__mutmut_{i}", a) for i in range(50)]
    mutants += [Mutant(f"{b.module}.x_f__mutmut_{i}", b) for i in range(50)]
    one = choose(mutants, 30, "seed-1", {b.path})
    assert len(one) == 30 and all(m.target is b for m in one)
    assert choose(list(reversed(mutants)), 30, "seed-1", {b.path}) == one  # the input order does not matter
    assert choose(mutants, 30, "seed-2", {b.path}) != one  # another commit, another sample
    mixed = choose(mutants, 60, "seed-1", {b.path})
    assert {m.name for m in mixed[:50]} == {m.name for m in mutants[50:]} and len(set(mixed)) == 60
    assert len(choose(mutants, 500, "x", set())) == 100


def test_modules_are_named_by_path_dotted_name_or_unique_stem() -> None:
    assert [t.path for t in resolve(["ingestor/sequencer.py", "distributor.ingress", "wsframes"])] == [
        "ingestor/sequencer.py", "distributor/ingress.py", "ingestor/wsframes.py",
    ]
    assert resolve([]) == list(TARGETS)
    assert [t.path for t in resolve(["backoff"])] == ["consumer_sdk/core/backoff.py"]
    two = (mutate.Target("ingestor/backoff.py", ()), mutate.Target("consumer_sdk/core/backoff.py", ()))
    with pytest.raises(mutate.UsageError, match="'backoff' is ambiguous"):
        resolve(["backoff"], two)
    with pytest.raises(mutate.UsageError, match=re.escape("'ingestor/service.py' is not a pure core module")):
        resolve(["ingestor/service.py"])


@pytest.mark.parametrize(("argv", "message"), [
    (["nope"], "'nope' is not a pure core module"),
    (["--sample", "0"], "--sample must be at least 1, got 0"),
    (["--time-box", "5"], "--time-box must be more than 15 seconds, got 5"),
])
def test_bad_arguments_exit_2_with_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert mutate.main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"ops.mutate: {message}\n" or err.startswith(f"ops.mutate: {message}")
    assert err.count("\n") == 1


def test_keep_refuses_a_directory_a_run_did_not_leave(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--keep DIR`` empties DIR first: only an empty directory or one a previous run left may be given."""
    (tmp_path / "notes.txt").write_text("mine")
    assert mutate.main(["sequencer", "--keep", str(tmp_path)]) == 2
    assert "not empty and not left by a previous run" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    afile = tmp_path / "notes.txt"
    assert mutate.main(["sequencer", "--keep", str(afile)]) == 2

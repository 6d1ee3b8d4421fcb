"""Every command fails with one line naming what is wrong (traceback only with --debug), and exits
non-zero."""
import json
import signal

import pytest

from tests.helpers import TINY_TRAIN_OVERRIDES, run_aerie
from tools.cli import COMMANDS, main


@pytest.fixture
def keep_signal_handlers():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def _bad_override(command):
    return "data.source=json" if command == "regen" else "target.path=/nonexistent/target"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_fails_in_one_line(command, capsys, hydra_restore, keep_signal_handlers):
    assert main([command, _bad_override(command)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"aerie {command}: error: "), err
    assert ("target.path='/nonexistent/target'" if command != "regen" else "data.source='json'") in err[0]


def test_debug_flag_shows_the_traceback(capsys, hydra_restore):
    assert main(["regen", "--debug", "data.source=json"]) == 1
    err = capsys.readouterr().err
    assert ("Traceback (most recent call last)" in err
            and err.strip().splitlines()[-1].startswith("aerie regen:"))


@pytest.mark.slow
def test_strict_data_error_is_one_line_from_the_real_script(tmp_path, data_cache):
    data = tmp_path / "rows.jsonl"
    good = {"id": "a",
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    data.write_text(json.dumps(good) + "\n{not json\n")
    proc = run_aerie("train", f"run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
                     *TINY_TRAIN_OVERRIDES, "data.source=openai", f"data.path={data}", "data.strict=true",
                     "data.heldout_ids_path=", check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("aerie train: error:")]
    assert errors == [proc.stderr.strip().splitlines()[-1]] and f"{data}:2" in errors[0], proc.stderr[-2000:]

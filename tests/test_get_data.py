"""scripts/get-data, which `make demo` and `make test` run first: the order in which it gets
Fashion-MNIST, checked with stand-ins for python, apt-get and sudo that record their calls."""
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "get-data"


def _stub(path: Path, body: str) -> Path:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return path


@pytest.fixture
def machine(tmp_path):
    """A bin folder with a python that finds the data once a marker file exists (apt-get makes it,
    the download too unless it is told to fail), and a log of every call."""
    bin_dir, log, marker = tmp_path / "bin", tmp_path / "calls.log", tmp_path / "data-here"
    bin_dir.mkdir()
    python = _stub(bin_dir / "python", f"""
echo "python $*" >> {log}
if [ -e {marker} ]; then exit 0; fi
case " $* " in *" --no-download "*) exit 1;; esac
if [ -n "$DOWNLOAD_WORKS" ]; then touch {marker}; exit 0; fi
echo "error: Fashion-MNIST not found" >&2; exit 1
""")
    _stub(bin_dir / "apt-get", f'echo "apt-get $*" >> {log}\n'
                               f'case "$*" in *install*) [ -n "$APT_WORKS" ] && touch {marker};; esac\nexit 0\n')
    _stub(bin_dir / "id", 'if [ "$1" = "-u" ]; then echo "${FAKE_UID:-0}"; else /usr/bin/id "$@"; fi\n')
    _stub(bin_dir / "sudo", f'echo "sudo $*" >> {log}\nif [ -n "$SUDO_WORKS" ]; then "${{@:2}}"; else exit 1; fi\n')

    def run(present=False, **env):
        marker.unlink(missing_ok=True)
        if present:
            marker.touch()
        log.write_text("")
        environment = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), **env}
        done = subprocess.run([str(SCRIPT), str(python)], env=environment, capture_output=True, text=True)
        return done.returncode, log.read_text().splitlines(), done.stdout + done.stderr

    return run


def test_data_already_here_installs_nothing(machine):
    rc, calls, _ = machine(present=True, APT_WORKS="1")
    assert rc == 0
    assert not any(call.startswith("apt-get") for call in calls)


def test_missing_data_comes_from_debian_as_root(machine):
    rc, calls, out = machine(APT_WORKS="1")
    assert rc == 0, out
    assert any("install -y -qq dataset-fashion-mnist" in call for call in calls)
    assert calls[-1].endswith("-m neumeta.data")  # and then the library finds it


def test_without_root_apt_goes_through_passwordless_sudo_only(machine):
    rc, calls, _ = machine(APT_WORKS="1", FAKE_UID="1000", SUDO_WORKS="1")
    assert rc == 0 and any(call.startswith("sudo -n apt-get install") for call in calls)

    rc, calls, out = machine(APT_WORKS="1", FAKE_UID="1000")  # sudo asks for a password: skip apt
    assert rc == 1 and not any(call.startswith("apt-get") for call in calls)
    assert "Fashion-MNIST not found" in out


def test_no_apt_falls_back_to_the_download(machine):
    rc, calls, _ = machine(NEUMETA_NO_APT="1", DOWNLOAD_WORKS="1", APT_WORKS="1")
    assert rc == 0
    assert not any(call.startswith("apt-get") for call in calls)


def test_apt_failing_falls_back_to_the_download_then_to_the_error(machine):
    rc, _, out = machine(DOWNLOAD_WORKS="1")  # apt-get "succeeds" but installs nothing
    assert rc == 0
    rc, _, out = machine()
    assert rc == 1 and "Fashion-MNIST not found" in out


def test_the_library_side_reports_where_it_looked(tmp_path, monkeypatch, capsys):
    """`python -m neumeta.data --no-download` with the data nowhere: exit 1, naming the folders."""
    from neumeta.data import __main__ as data_main, fashion_mnist
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NEUMETA_DATA_DIR", raising=False)
    assert data_main.main(["--no-download"]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "system") in err and "Download was disabled" in err
    assert data_main.main(["--no-download", "--data-dir", str(tmp_path / "mine")]) == 1  # only there
    err = capsys.readouterr().err
    assert f"--data-dir {tmp_path / 'mine'}: no such folder" in err and str(tmp_path / "system") not in err

"""Files holding flow data or state are not for every local user (issue 12 item 8).

The JSON lines output (flows: who talked to whom), the netns ids (pod and
namespace names), the tc ownership state and the crash journal are created
0600 in 0700 directories; jsonLinesMode sets another mode for the JSON
lines (a log shipper's group, say), also on a file an older version left 0644.
"""

from __future__ import annotations

import glob
import os
import stat

import pytest

from kipfix.agent.config import ConfigError, parse_config
from kipfix.agent.datapath.netnsids import default_path
from router import sh


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.root
def test_flow_and_state_files_are_private(router, agent_factory, tmp_path, monkeypatch):
    tc_state = tmp_path / "state" / "tc-state.json"
    monkeypatch.setenv("KIPFIX_TC_STATE", str(tc_state))
    os.umask(0o022)
    proc = agent_factory({"interfaces": [{"netns": router.r, "names": ["r1"]}]}).start()
    proc.wait_log("attached kipfix to r1")
    sh(f"ip netns exec {router.h1} ping -c 2 -i 0.02 -q 10.2.0.1")
    router.settle()
    journal = glob.glob(f"/run/kipfix/journal{proc.pin_path.replace('/', '_')}-*")
    files = [proc.config["jsonLines"], default_path(proc.pin_path), str(tc_state), f"{tc_state}.lock", *journal]
    assert len(journal) == 3  # the journal, its log and the cursor file
    for path in files:
        assert (path, mode(path)) == (path, 0o600)
    assert mode(tc_state.parent) == 0o700
    proc.stop()


@pytest.mark.root
def test_json_lines_mode_is_applied_to_new_and_old_files(router, agent_factory, tmp_path):
    old = tmp_path / "flows.jsonl"
    old.write_text("")
    os.chmod(old, 0o644)  # as earlier versions left it
    proc = agent_factory({"interfaces": [{"netns": router.r, "names": ["r1"]}], "jsonLinesMode": "0640"}).start()
    assert mode(old) == 0o640
    assert "jsonLines" in proc.log() and "had mode 0644; set to 0640" in proc.log()
    proc.stop()


@pytest.mark.parametrize("value", [640, "0800", "rw-r-----", "06400", 0o640])
def test_json_lines_mode_must_be_a_quoted_octal_mode(value):
    with pytest.raises(ConfigError) as err:
        parse_config({"jsonLines": "/tmp/x", "jsonLinesMode": value})
    assert str(err.value).startswith(f"jsonLinesMode: {value!r} is not accepted; accepted: a quoted octal")
    assert parse_config({"jsonLinesMode": "0640"}).json_lines_mode == 0o640

"""The seams between the planes: runtime/contract.py (what launcher and runtime agree on) and the
step decision's wire format (runtime/decision.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from runtime import contract
from runtime.decision import VERSION, Insert, StepDecision, VersionMismatch


def test_planner_and_catalogue_load_no_mlx():
    code = ("import sys, launcher.planner, launcher.catalogue, launcher.cli; "
            "print(sorted(m for m in sys.modules if m == 'mlx' or m.startswith(('mlx.', 'mlx_lm'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().replace("'", '"')) == []


def test_contract_imports_only_the_standard_library():
    code = ("import sys; before = set(sys.modules); import runtime.contract; "
            "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
            "print(sorted(new - set(sys.stdlib_module_names) - {'runtime'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("model,kind,name,size", [
    ("demo-llama", "demo", "demo-llama", None),
    ("demo-kimi:tiny", "demo", "demo-kimi", "tiny"),
    ("mlx-community/Qwen3-8B-4bit", "hub", "mlx-community/Qwen3-8B-4bit", None),
])
def test_classify_model(model, kind, name, size):
    ref = contract.classify_model(model)
    assert (ref.kind, ref.name, ref.size) == (kind, name, size)


def test_classify_model_directory_and_unknown(tmp_path):
    ref = contract.classify_model(str(tmp_path))
    assert ref.kind == "dir" and ref.path == tmp_path
    assert contract.classify_model("kimi-k2") is None  # a catalogue name is the launcher's business
    assert contract.classify_model("./not/here") is None
    with pytest.raises(contract.ModelError, match="not an mlx-lm model directory"):
        contract.resolve_model(str(tmp_path))
    with pytest.raises(contract.ModelError, match="no such directory, demo model"):
        contract.resolve_model("kimi-k2")


def test_control_port_rule_round_trips_through_the_environment():
    addr = contract.control_address(["10.0.0.5", "10.0.1.5"], 52600)
    assert addr == ("10.0.0.5", 52599)
    assert contract.parse_control(contract.format_control(addr)) == addr
    assert contract.parse_control(None) == ("127.0.0.1", contract.DEFAULT_DATA_PORT - 1)
    assert contract.control_address([], 6000) == ("127.0.0.1", 5999)


def test_check_sharding_names_the_numbers(tmp_path):
    cfg = {"num_attention_heads": 9, "num_key_value_heads": 3, "num_hidden_layers": 2}
    assert contract.check_sharding(tmp_path, cfg, 3, "tensor", "m").even
    assert contract.check_sharding(tmp_path, cfg, 2, "tensor", "m").kv_heads == (2, 1)  # uneven
    with pytest.raises(contract.ModelError, match="num_attention_heads=9, num_key_value_heads=3"):
        contract.check_sharding(tmp_path, cfg, 4, "tensor", "m")
    with pytest.raises(contract.ModelError, match="model.safetensors.index.json"):
        contract.check_sharding(tmp_path, cfg, 2, "pipeline", "m")
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(contract.ModelError, match="2 layers cannot be split into 3"):
        contract.check_sharding(tmp_path, cfg, 3, "pipeline", "m")


def test_step_decision_round_trip():
    d = StepDecision([Insert([1, 2, 3], 16, 0.7, 0.9, 40, 1234, eos=True, grammar={"type": "json_object"}),
                      Insert([4], 1, 0.0, 1.0, 0, 7, eos=False)], removes=[5, 6], step=True)
    back = StepDecision.decode(d.encode())
    assert back == d
    assert back.version == VERSION


def test_step_decision_refuses_another_version_and_garbage():
    msg = json.loads(StepDecision(step=True).encode())
    msg["v"] = VERSION + 1
    with pytest.raises(VersionMismatch, match="same exolaunch version"):
        StepDecision.decode(json.dumps(msg).encode())
    msg["v"] = VERSION
    msg["ins"] = [{"tokens": [1], "nonsense": 1}]
    with pytest.raises(ValueError, match="malformed step decision"):
        StepDecision.decode(json.dumps(msg).encode())


def test_control_channel_carries_decisions_and_refuses_a_mismatched_rank():
    import socket
    import threading

    from runtime import control

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    leader = control.Leader("127.0.0.1", port, 2, secret=b"job")
    follower_box = {}
    t = threading.Thread(target=lambda: follower_box.setdefault(
        "f", control.Follower("127.0.0.1", port, 1, 10, secret=b"job")))
    t.start()
    leader.accept_all(10)
    t.join()
    d = StepDecision([Insert([9, 8], 4, 1.0, 1.0, 0, 3, eos=True)], step=True)
    leader.broadcast(d.encode())
    assert StepDecision.decode(follower_box["f"].recv()) == d
    leader.close()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    leader = control.Leader("127.0.0.1", port, 2, secret=b"job")

    def old_rank():  # a rank of this job (it has the secret) that speaks an older version
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        n0, n1 = control._recv(sock)["nonce"], "0" * 32
        control._send(sock, {"rank": 1, "version": VERSION - 1, "nonce": n1,
                             "mac": control._mac(b"job", "hello", n0, n1, 1, VERSION - 1)})
        return sock

    t = threading.Thread(target=lambda: follower_box.__setitem__("old", old_rank()))
    t.start()
    with pytest.raises(RuntimeError, match="rank 1: step message version"):
        leader.accept_all(10)
    t.join()
    follower_box["old"].close()

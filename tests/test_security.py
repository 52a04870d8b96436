"""Weights never unpickle code, parameters never reach a shell, servers listen
on this machine only, stage paths stay inside the project."""
from __future__ import annotations

import json
import pathlib
import pickle
import shutil

import pytest
import torch
from conftest import ROOT


class Payload:
    """A pickle that runs code when loaded: it creates `marker`."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def evil_checkpoint(path: pathlib.Path, marker: pathlib.Path) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": Payload(marker)}, path)
    return path


def test_malicious_training_checkpoint_is_refused(tmp_path):
    from mirage.models.checkpoint import Checkpoints

    marker = tmp_path / "pwned"
    ckpt = Checkpoints("train_detector", "k", every=10, root=tmp_path)
    evil_checkpoint(ckpt.folder / "round-0-step-0000010.pt", marker)
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        ckpt.latest(0)
    assert not marker.exists()


def test_malicious_encoder_weights_are_refused(tmp_path):
    """An open_clip encoder directory whose weights are a pickle (not safetensors)."""
    from mirage.models.encoders import load_encoder

    marker = tmp_path / "pwned"
    enc = tmp_path / "encoder"
    shutil.copytree(ROOT / "models" / "encoder", enc)
    (enc / "open_clip_model.safetensors").unlink()
    evil_checkpoint(enc / "open_clip_pytorch_model.bin", marker)
    # refused by torch.load(weights_only=True) itself: not an early error of another kind
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_encoder(f"local-dir:{enc}")
    config = json.loads((enc / "open_clip_config.json").read_text())
    arch = config.get("model_name", "mirage-toy-clip")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_encoder(f"{arch}:{enc / 'open_clip_pytorch_model.bin'}")  # ARCH:/path/weights as a pretrained file
    assert not marker.exists()


def test_stage_commands_never_reach_a_shell(tmp_path):
    from flows.pipeline import stage_module

    marker = tmp_path / "pwned"
    with pytest.raises(ValueError, match="is not 'python -m flows.<stage>"):
        stage_module(f"touch {marker}")
    with pytest.raises(ValueError):
        stage_module(f"python -c 'open(\"{marker}\", \"w\")'")
    module, args = stage_module(f"python -m flows.toyworld --out data/x; touch {marker}")
    assert args == ["--out", "data/x;", "touch", str(marker)]  # words for argparse, not a shell line
    with pytest.raises(SystemExit):  # argparse refuses the extra words
        module.main(args)
    assert not marker.exists()


def test_servers_and_workers_listen_on_this_machine_only():
    from mirage import cli
    from mirage.data.params import Runner
    from mirage.run.runner import cluster_kwargs

    parser_defaults = {}

    def capture(args):
        parser_defaults.update(vars(args))
        return 0

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(cli, "cmd_server", capture)
    try:
        assert cli.main(["server"]) == 0
    finally:
        monkeypatch.undo()
    assert parser_defaults["host"] == "127.0.0.1"
    assert cluster_kwargs(Runner())["host"] == "127.0.0.1"
    from prefect.server.api.server import SubprocessASGIServer

    assert SubprocessASGIServer(port=8123).address.startswith("http://127.0.0.1:")  # the temporary server's bind

"""Bad parameters are refused before any work starts: exit 2, the key named,
params.yaml unchanged, no output touched."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mirage import cli

CASES = [  # (-S override, what the message must name)
    ("generate.per_prompt=0", "generate.per_prompt"),
    ("generate.per_prompt=many", "generate.per_prompt"),
    ("generate.steps=-1", "generate.steps"),
    ("generate.guidance=-1", "generate.guidance"),
    ("generate.batch_size=0", "generate.batch_size"),
    ("generate.tome_ratio=0.5", "generate.tome_ratio"),  # the toy UNet has no transformer blocks
    ("generate.image_size=4", "generate.image_size"),
    ("generate.dtype=float64", "generate.dtype"),
    ("generate.device=cuda:99", "generate.device"),  # a CUDA device this machine does not have
    ("generate.device=gpu0", "generate.device"),
    ("generate.prompt_templates=[a photo]", "generate.prompt_templates"),
    ("generate.model=/no/such/pipeline", "generate.model"),
    ("generate.model=models/nothing", "generate.model"),
    ("generate.per_promt=5", "did you mean 'generate.per_prompt'"),
    ("featurs.encoder=x", "did you mean 'features'"),
    ("features.encoder=random:NotAnArch:0", "features.encoder"),
    ("features.encoder=ViT-B-32:no_such_tag", "features.encoder"),
    ("features.encoder=timm:not_a_timm_model", "features.encoder"),
    ("features.encoder=models/nothing", "features.encoder"),
    ("features.patch_backbone=unet:down_blocks.9.nope:10", "features.patch_backbone"),
    ("features.patch_backbone=bogus", "patch_backbone"),
    ("features.patch_backbone=concepts:sideways", "features.patch_backbone"),
    ("features.batch_size=0", "features.batch_size"),
    ("features.workers=-1", "features"),
    ("features.tome_r=-1", "tome_r"),
    ("discover.solver=arpack", "discover.solver"),
    # a CUDA device where there is none (on a GPU machine `cuda` is a fine value: then not a bad one)
    *([] if torch.cuda.is_available() else [("features.device=cuda", "features.device")]),
    ("discover.tau=2", "discover.tau"),
    ("discover.tau=-1", "a complete graph"),  # accepted once: discover took 50 times as long
    ("sources.images=[no_such_dir]", "sources.images[0] 'no_such_dir': no such file or folder"),
    ("sources.images=[data/toyworld/test]", "sources.images[0] 'data/toyworld/test': names no image file"),
    ("discover.tua=0.5", "did you mean 'discover.tau'"),
    ("discover.method=spectral", "discover.method"),
    ("curate.dedup_eps=1.5", "curate.dedup_eps"),
    ("curate.clusters=[0, 2]", "curate.clusters"),
    ("curate.target=0", "curate.target"),
    ("evaluate.reference=laion", "evaluate.reference"),
    ("concepts.generator_layers=[down_blocks.7.resnets.0]", "concepts.generator_layers"),
    ("concepts.models=[models/nothing]", "concepts.models[0]"),
    ("concepts.top_k=0", "concepts.top_k"),
    ("concepts.sources=[web]", "concepts.sources"),
    ("evaluate.quality_n=-1", "evaluate.quality_n"),
    ("discover.eps=0", "discover.eps"),
    ("discover.min_area=1.5", "discover.min_area"),
    ("discover.eps=1", "discover.eps"),  # a dissimilar pair as heavy as a similar one
    ("toyworld.object_size=[18, 10]", "toyworld.object_size"),
    ("toyworld.object_size=[10, 64]", "toyworld.object_size"),  # larger than the image
    ("toyworld.image_size=8", "toyworld.image_size"),
    ("toyworld.test.min_objects=4", "toyworld.test"),
    ("toyworld.train.n=-5", "toyworld.train.n"),
    ("toyworld.classes=[circle]", "toyworld.classes"),
    ("train_detector.lr=0", "train_detector.lr"),
    ("train_detector.drop_loss_iou=1", "train_detector.drop_loss_iou"),
    ("train_detector.self_train_scores=[1.5]", "train_detector.self_train_scores"),
    ("train_generator.label_dropout=1", "train_generator.label_dropout"),
    ("evaluate.iou=0", "evaluate.iou"),
    ("runner.kind=spark", "runner.kind"),
    ("runner.cluster_class=nope.Cluster", "runner.cluster_class"),
    ("runner.address=localhost", "runner.address"),
    ("runner.parallel_stages=0", "runner.parallel_stages"),
    ("alerts.webhook=ftp://example.org", "alerts.webhook"),
]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file of the project (outputs, models, dvc.lock, params.yaml) -> (size, mtime); .mirage/ (the run
    lock, the pool) is runtime state."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file() and not {".dvc", ".mirage", "__pycache__"} & set(p.parts)}


@pytest.fixture(scope="module")
def shared(done, tmp_path_factory) -> Path:
    """One copy of the finished tiny project for every case (each must leave it as it was)."""
    root = tmp_path_factory.mktemp("bad") / "project"
    shutil.copytree(done, root, symlinks=True)
    return root


@pytest.mark.parametrize("override, named", CASES, ids=[c[0] for c in CASES])
def test_bad_parameter_is_refused_before_any_work(shared, capsys, override, named):
    params_before = (shared / "params.yaml").read_bytes()
    before = snapshot(shared)
    code = cli.main(["--root", str(shared), "run", "-S", override])
    err = capsys.readouterr().err
    assert code == 2, err
    assert named in err
    assert (shared / "params.yaml").read_bytes() == params_before
    assert snapshot(shared) == before


def test_stage_paths_stay_inside_the_project(shared):
    """A stage command (as dvc.yaml or a user writes it) cannot write outside its project."""
    outside = shared.parent / "escaped"
    run = subprocess.run([sys.executable, "-m", "flows.toyworld", "--out", "../escaped"], cwd=shared,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "--out '../escaped' of stage toyworld is outside the project" in run.stderr
    assert not outside.exists()

"""``import sd_plugin`` has no surprises; MMPretrain configs find sd_plugin's components only when they name them.

Each check runs in a fresh interpreter (``-W error``: any warning fails it) and reports the frameworks it loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("mmpretrain", "mmcv", "mmengine")
REPORT = "import json, sys; print('LOADED=' + json.dumps(sorted({m.split('.')[0] for m in sys.modules}), indent=None))"


def _run(code: str, *flags: str) -> tuple[set, str]:
    proc = subprocess.run(
        [sys.executable, *flags, "-c", f"{code}\n{REPORT}"], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("LOADED="))
    return set(json.loads(line[len("LOADED=") :])), proc.stderr


def test_import_sd_plugin_loads_no_openmmlab_module_and_warns_nothing():
    loaded, err = _run("import sd_plugin", "-W", "error")
    assert "sd_plugin" in loaded
    assert not loaded & set(HEAVY), loaded & set(HEAVY)
    assert err == ""


def test_wrap_on_a_timm_model_loads_no_openmmlab_module_and_warns_nothing():
    pytest.importorskip("timm")
    code = (
        "import torch, timm, sd_plugin\n"
        "m = sd_plugin.wrap(timm.create_model('resnet18', num_classes=10))\n"
        "m.train(); out = m(torch.randn(2, 3, 64, 64)); assert len(out.exit_logits) == 3"
    )
    loaded, err = _run(code, "-W", "error")
    assert not loaded & set(HEAVY), loaded & set(HEAVY)
    assert err == ""


@pytest.mark.parametrize("command", [[], ["train"], ["train-timm"]], ids=["sd-plugin", "train", "train-timm"])
def test_command_line_help_loads_no_openmmlab_module_and_warns_nothing(command):
    """``sd-plugin --help`` and the training commands' help: the heavy imports wait until a command runs."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['sd-plugin', *{command!r}, '--help']\n"
        "try:\n    runpy.run_module('sd_plugin', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code"
    )
    loaded, err = _run(code, "-W", "error")
    assert not loaded & set(HEAVY), loaded & set(HEAVY)
    assert "timm" not in loaded
    assert err == ""


PLAIN = """
_base_ = ['mmpretrain::resnet/resnet18_8xb16_cifar10.py']
"""
BUILD = """
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
cfg = Config.fromfile({path!r})
init_default_scope('mmpretrain')
model = MODELS.build(cfg.model)
print('BUILT=' + type(model).__name__)
"""


@pytest.mark.mmpretrain
@pytest.mark.parametrize(
    "config, built, imports_sd_plugin",
    [
        (PLAIN, "ImageClassifier", False),
        (PLAIN + "model = dict(type='sd_plugin.SelfDistillClassifier')\n", "SelfDistillClassifier", True),
        (
            PLAIN
            + "custom_imports = dict(imports=['sd_plugin'], allow_failed_imports=False)\n"
            + "model = dict(type='SelfDistillClassifier')\n",
            "SelfDistillClassifier",
            True,
        ),
    ],
    ids=["plain", "one-line", "two-line"],
)
def test_configs_import_sd_plugin_only_when_they_name_it(tmp_path, config, built, imports_sd_plugin):
    pytest.importorskip("mmpretrain")
    path = tmp_path / "cfg.py"
    path.write_text(config)
    proc = subprocess.run(
        [sys.executable, "-c", BUILD.format(path=str(path)) + REPORT],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"BUILT={built}" in proc.stdout
    loaded = set(json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("LOADED="))[7:]))
    assert ("sd_plugin" in loaded) is imports_sd_plugin


@pytest.mark.mmpretrain
def test_every_registered_component_is_reachable_by_its_scoped_name():
    pytest.importorskip("mmpretrain")
    code = """
from mmengine.registry import DATA_SAMPLERS, HOOKS, METRICS, MODELS, OPTIM_WRAPPERS, STRATEGIES, init_default_scope
init_default_scope('mmpretrain')
names = {MODELS: ['SelfDistillClassifier', 'SelfDistillExitNeck', 'SelfDistillLoss'],
         HOOKS: ['DistillWeightWarmupHook', 'ProgressiveSelfKDHook', 'SaveStrippedCheckpointHook', 'RNGStateHook'],
         METRICS: ['MultiExitAccuracy', 'MultiExitAveragePrecision'], DATA_SAMPLERS: ['ClassPairSampler'],
         OPTIM_WRAPPERS: ['CPUAutocastOptimWrapper'], STRATEGIES: ['ResumableFSDPStrategy']}
for root, found in names.items():
    with root.switch_scope_and_registry('mmpretrain') as reg:  # what build() does under the config's scope
        for name in found:
            cls = reg.get('sd_plugin.' + name)
            assert cls is not None and cls.__name__ == name, (root.name, name, cls)
            assert cls.__module__.startswith('sd_plugin.'), cls.__module__
from mmengine.fileio.backends import backends
assert 'sd_atomic_local' in backends
print('ALL-OK')
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ALL-OK" in proc.stdout

"""``import sd_plugin`` leaves torch's ``weights_only`` allow-list alone; mmengine's own loads still read checkpoints.

The crafted file names ``builtins.getattr`` and, loaded, hands back ``builtins.eval``
(``getattr(getattr(getattr, '__self__'), 'eval')``): what an allow-listed ``getattr`` gives away.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from _rel_helpers import make_image_folder, mm_config, sd_resnet, write_config
from _rel_run import PYTHON, probe, run_cmd, run_mm_inprocess

from sd_plugin._safe_globals import mmengine_safe_globals


class _Builtins:
    def __reduce__(self):
        return (getattr, (getattr, "__self__"))


class _Eval:
    def __reduce__(self):
        return (getattr, (_Builtins(), "eval"))


@pytest.fixture()
def crafted(tmp_path: Path) -> Path:
    path = tmp_path / "crafted.pth"
    torch.save({"weights": torch.zeros(2), "hook": _Eval()}, path)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == ["builtins.getattr"]
    return path


def test_crafted_getattr_file_is_refused_after_import_sd_plugin(crafted):
    import sd_plugin  # noqa: F401

    with pytest.raises(pickle.UnpicklingError, match="Unsupported global: GLOBAL getattr"):
        torch.load(crafted, weights_only=True)
    with mmengine_safe_globals():  # the scope mmengine's loads run in: there the file does load (so the test can fail)
        assert torch.load(crafted, weights_only=True)["hook"] is eval
    with pytest.raises(pickle.UnpicklingError, match="Unsupported global: GLOBAL getattr"):
        torch.load(crafted, weights_only=True)


@pytest.mark.slow
def test_the_allow_list_is_the_same_with_and_without_the_plugin(tmp_path, crafted):
    """In a fresh interpreter: torch's allow-list before ``import sd_plugin``, after it, and after an mmengine load."""
    script = f"""
import json, torch
def ours():  # what is not torch's own (torch adds its DTensor/DeviceMesh classes when those modules load)
    return sorted(repr(g) for g in torch.serialization.get_safe_globals()
                  if not str(getattr(g, '__module__', '')).startswith('torch'))
before = ours()
import sd_plugin
after = ours()
try:
    torch.load({str(crafted)!r}, weights_only=True)
    refused = False
except Exception as err:
    refused = 'Unsupported global: GLOBAL getattr' in str(err)
print(json.dumps(dict(same=before == after, refused=refused, added=sorted(set(after) - set(before)))))
"""
    out = json.loads(run_cmd([PYTHON, "-c", script]).stdout.strip().splitlines()[-1])
    assert out == dict(same=True, refused=True, added=[])


def test_nested_and_user_added_globals_survive_the_scope():
    """The scope removes only what it added: a user's own allowance stays, nested scopes keep the outer one."""
    torch.serialization.add_safe_globals([getattr])
    try:
        with mmengine_safe_globals():
            with mmengine_safe_globals():
                pass
            assert any(g is getattr for g in torch.serialization.get_safe_globals())
        assert any(g is getattr for g in torch.serialization.get_safe_globals())  # the user's, kept
    finally:
        torch.serialization.clear_safe_globals()
    with mmengine_safe_globals():
        with mmengine_safe_globals():
            pass
        assert any(g is getattr for g in torch.serialization.get_safe_globals())  # outer scope still open
    assert not any(g is getattr for g in torch.serialization.get_safe_globals())


@pytest.mark.slow
@pytest.mark.mmpretrain
def test_resume_and_load_from_need_no_environment_variable(tmp_path, monkeypatch):
    """The real Runner: a 2-iteration run, then ``--resume`` to iteration 3 and a ``load_from`` run."""
    for var in ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_WEIGHTS_ONLY_LOAD"):
        monkeypatch.delenv(var, raising=False)
    data = make_image_folder(tmp_path / "data", num_classes=2, per_class=4)
    common = dict(data_root=data, model=sd_resnet(), checkpoint_interval=2)
    run_mm_inprocess(
        write_config(mm_config(work_dir=tmp_path / "a", max_iters=2, **common), tmp_path / "a.py"), name="sl_a"
    )
    ckpt = tmp_path / "a" / "iter_2.pth"
    assert "builtins.getattr" in torch.serialization.get_unsafe_globals_in_checkpoint(str(ckpt))

    resumed = write_config(mm_config(work_dir=tmp_path / "a", max_iters=3, **common), tmp_path / "a3.py")
    run_mm_inprocess(resumed, "--resume", str(ckpt), name="sl_resume")
    assert [r["iter"] for r in probe(tmp_path / "a")["records"]] == [2]  # went on from iteration 2

    loaded = write_config(mm_config(work_dir=tmp_path / "b", max_iters=1, **common), tmp_path / "b.py")
    run_mm_inprocess(loaded, "--cfg-options", f"load_from={ckpt}", name="sl_load_from")
    log = next((tmp_path / "b").glob("*/*.log")).read_text()
    assert f"Load checkpoint from {ckpt}" in log
    with pytest.raises(pickle.UnpicklingError):  # and the allowance is gone again
        torch.load(ckpt, weights_only=True)

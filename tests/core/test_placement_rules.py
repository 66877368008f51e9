"""One test per placement rule of the exit engine, each on a small synthetic model that needs the rule.

Every named constant of ``_cuts``, ``_candidates``, ``_choice`` and ``_find`` (and the two stem tests of ``group``)
has a test here that fails when the rule is switched off (the constant set to a value that disables it), and for a
threshold mostly also one that fails when it is moved the other way. The comment of each constant names the real
architectures that need it.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

import pytest
import torch
import torch.nn as nn

from sd_plugin.core import SelfDistillConfig
from sd_plugin.core.engine import ExitLayout, find_exit_layout
from sd_plugin.core.engine._candidates import tensor_layout
from sd_plugin.core.engine._find import _real_forward_seconds

CFG = SelfDistillConfig()


def _layout(model: nn.Module, size: int = 64, probe: str = "meta") -> ExitLayout:
    return find_exit_layout(model, model, (3, size, size), CFG, probe=probe)


def _conv(cin: int, cout: int, stride: int = 1, kernel: int = 3, padding: int = 1) -> nn.Sequential:
    """A stage: one convolution and its activation (a container, as stages are)."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding), nn.ReLU())


class Residual(nn.Module):
    """A repeated block: ``x + f(x)``, the same type and output shape each time."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(c, c, 3, 1, 1), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.conv(x))


class TokenBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm, self.fc1, self.act, self.fc2 = nn.LayerNorm(c), nn.Linear(c, c), nn.GELU(), nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class Net(nn.Module):
    """Runs its parts in order (a ``ModuleList`` element by element), then pools in the forward code and classifies.

    Maps become tokens (N, L, C) where a part's name starts with ``blocks`` and the input is still a map.
    """

    def __init__(self, parts: Dict[str, nn.Module], width: int, squeeze: bool = False) -> None:
        super().__init__()
        for name, part in parts.items():
            self.add_module(name, part)
        self.fc = nn.Linear(width, 5)
        self.squeeze = squeeze

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name, part in self.named_children():
            if name == "fc":
                continue
            if name.startswith("blocks") and x.dim() == 4:
                x = x.flatten(2).transpose(1, 2)
            for module in part if isinstance(part, nn.ModuleList) else [part]:
                x = module(x)
        if self.squeeze:  # (N, C, 1, 1) -> (N, C) the way some heads do it: every size-1 dimension goes
            return self.fc(x.mean((2, 3), keepdim=True).squeeze())
        return self.fc(x.mean((2, 3)) if x.dim() == 4 else x.mean(1))


def _stages(strides: List[int], width: int = 8, cin: int = 3) -> nn.ModuleList:
    return nn.ModuleList(_conv(cin if i == 0 else width, width, s) for i, s in enumerate(strides))


def _names(n: int, prefix: str) -> Tuple[str, ...]:
    return tuple(f"{prefix}.{i}" for i in range(n))


# --- _cuts: PROBE_BATCH -----------------------------------------------------------------------------------------


def test_probe_batch_keeps_more_than_one_sample_so_a_squeezing_head_passes_the_cut_test() -> None:
    # The shrink test hands on PROBE_BATCH - 1 samples. With one sample left, the head's ``squeeze()`` (MMPretrain's
    # LeNet-5) also drops the batch dimension, the output no longer shows the smaller batch, and no module is a cut.
    layout = _layout(Net({"stages": _stages([4, 2, 2, 2])}, 8, squeeze=True))
    assert layout.kind == "stage" and layout.positions == _names(4, "stages")


class SideBranch(nn.Module):
    """Three stages and a side branch from the first one, at its own resolution, added back into the second one."""

    def __init__(self) -> None:
        super().__init__()
        self.s0, self.side, self.s1, self.s2 = _conv(3, 8, 4), _conv(8, 8, 4), _conv(8, 8, 2), _conv(8, 8, 2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.s0(x)
        side = self.side(x)  # 4 x 4 at 64 px
        x = self.s1(x) + nn.functional.interpolate(side, scale_factor=2.0)
        return self.fc(self.s2(x).mean((2, 3)))


def test_a_side_branch_fails_the_cut_test() -> None:
    # SAMPLES_DROPPED: fewer samples handed on from ``side`` meet ``s1``'s full batch (and the other way round), so
    # neither is a cut; the sum after them is not a module. Dropping none, every module passes and both get exits.
    layout = _layout(SideBranch())
    assert layout.positions == ("s0", "s2")


# --- _candidates ------------------------------------------------------------------------------------------------


def test_aspect_tolerance_reads_rounded_channels_last_maps_as_maps() -> None:
    # ASPECT_TOLERANCE. A 75 x 64 input through two stride-2 layers gives a 19 x 16 map: 3.95x and 4x per side, not
    # one exact factor.
    nhwc = torch.empty(3, 19, 16, 40, device="meta")
    assert tensor_layout(nhwc, (75, 64)) == ("NHWC", 40, (19, 16))
    nchw = torch.empty(3, 40, 19, 16, device="meta")  # the same map channels-first stays channels-first
    assert tensor_layout(nchw, (75, 64)) == ("NCHW", 40, (19, 16))


class ConvHead(nn.Module):
    """A stage-structured net whose head is a convolution over the whole last map (4 x 4 -> 1 x 1), then a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = _stages([4, 2, 2])  # 16, 8, 4 at 64 px
        self.head_conv = nn.Conv2d(8, 16, 4)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.fc(self.head_conv(x).flatten(1))


def test_a_layer_that_takes_more_than_four_positions_to_one_ends_the_main_path() -> None:
    # STAGE_MAX_POSITIONS_TO_ONE. Reducing a 4 x 4 map to one position is more than a stage's 2x downsampling: the
    # head has begun (CSATv2, LeViT, SHViT: without the rule the path ends elsewhere).
    layout = _layout(ConvHead())
    assert layout.positions == _names(3, "stages")


def test_a_stage_that_takes_four_positions_to_one_stays_on_the_main_path() -> None:
    # STAGE_MAX_POSITIONS_TO_ONE, from below. At a small input the last stage may downsample 2 x 2 to 1 x 1 (LeViT,
    # EfficientViT-M, SHViT at 64 px): still a stage.
    layout = _layout(Net({"stages": _stages([4, 2, 2, 2, 2])}, 8))  # 16, 8, 4, 2, 1 at 64 px
    assert layout.positions == _names(5, "stages")
    assert [p.stride for p in layout.points] == [16, 8, 4, 2]


class PoolModule(nn.Module):
    """Stages, then global pooling as a module on a 2 x 2 map (4 positions), then the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = _stages([4, 2, 2, 2])  # 16, 8, 4, 2 at 64 px
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.fc(self.pool(x).flatten(1))


def test_a_pooling_module_ends_the_main_path_even_on_a_small_map() -> None:
    # POOL_CLASS_MARKER. Without it the head after the pooling (GhostNet's ``conv_head``, DLA's ``fc``) is a stage.
    layout = _layout(PoolModule())
    assert layout.positions == _names(4, "stages")


def test_a_container_over_several_resolutions_is_opened() -> None:
    # MIN_RESOLUTIONS_TO_DESCEND. VGG-like (DenseNet's ``features`` alike): one Sequential of single layers holds
    # every stage; a stage ends with its last layer at its resolution (the ReLU before each pooling; the container
    # itself hands on the last pooling's output).
    layers: List[nn.Module] = []
    for cin in (3, 8, 8, 8):
        layers += [nn.Conv2d(cin, 8, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2)]
    layout = _layout(Net({"features": nn.Sequential(*layers)}, 8))
    assert layout.kind == "stage"
    assert layout.positions == ("features.7", "features.10", "features")


def test_a_downsampling_module_is_not_opened() -> None:
    # MIN_RESOLUTIONS_TO_DESCEND, from below. ConvNeXt-like: each stage follows a downsampling module (norm at the old
    # resolution, then a strided conv). Opened, its norm would end the previous stage's run and take its exit.
    parts: Dict[str, nn.Module] = {"stem": _conv(3, 8, 4)}
    for i in (1, 2, 3):
        parts[f"down{i}"] = nn.Sequential(nn.BatchNorm2d(8), nn.Conv2d(8, 8, 2, 2))
        parts[f"stage{i}"] = Residual(8)
    layout = _layout(Net(parts, 8))
    assert layout.positions == ("stem", "stage1", "stage2", "stage3")


# --- _choice: stage ends ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "stem"),
    [(64, _conv(3, 8, 2)), (75, _conv(3, 8, 2, padding=0))],  # a stride-2 stem; a valid-padding one (75 -> 37)
    ids=["stride2", "valid_padding"],
)
def test_stem_level_runs_carry_no_exit_when_three_stages_remain(size: int, stem: nn.Module) -> None:
    # STEM_MAX_REDUCTION (2x and Inception-v3's 2.03x are stem level, 4x is not) and MIN_STAGES_AFTER_STEM (3 remain).
    stages = nn.ModuleList([stem, *(_conv(8, 8, 2) for _ in range(3))])  # 2x, then 4x, 8x, 16x
    layout = _layout(Net({"stages": stages}, 8), size)
    assert layout.positions == _names(4, "stages")[1:]


def test_a_net_with_fewer_than_three_deeper_stages_keeps_its_stem() -> None:
    # MIN_STAGES_AFTER_STEM, from below: a CIFAR ResNet at 32 px keeps its 1x and 2x stages.
    layout = _layout(Net({"stages": _stages([2, 2, 2])}, 8))  # 2x, 4x, 8x
    assert layout.positions == _names(3, "stages")


def test_a_lone_stem_module_before_the_stages_carries_no_exit() -> None:
    # group's lone-stem test. TinyViT-like: ``patch_embed`` (4x: no stem by its reduction) is no sibling of the stage
    # ends.
    parts = {"patch_embed": _conv(3, 8, 4, kernel=4, padding=0), "stages": _stages([2, 2, 2, 2], cin=8)}
    layout = _layout(Net(parts, 8), 128)
    assert layout.positions == _names(4, "stages")


def test_single_layers_before_stage_modules_carry_no_exit_a_net_of_single_layers_keeps_them() -> None:
    # group's single-layers test. Conformer-like: conv1 and maxpool, single layers, before the stage modules.
    parts = {"conv1": nn.Conv2d(3, 8, 3, 2, 1), "maxpool": nn.MaxPool2d(2)}
    parts.update({f"stage{i}": _conv(8, 8, 2) for i in (1, 2, 3)})
    assert _layout(Net(parts, 8), 128).positions == ("stage1", "stage2", "stage3")
    # LeNet-like: single layers only.
    leaves = {"conv1": nn.Conv2d(3, 8, 3, 2, 1), "pool1": nn.MaxPool2d(2)}
    leaves.update({f"conv{i}": nn.Conv2d(8, 8, 3, 2, 1) for i in (2, 3, 4)})
    assert _layout(Net(leaves, 8), 128).positions == ("pool1", "conv2", "conv3", "conv4")


# --- _choice: blocks ---------------------------------------------------------------------------------------------


def _isotropic(blocks: int) -> Net:
    return Net({"embed": nn.Conv2d(3, 16, 8, 8), "blocks": nn.ModuleList(TokenBlock(16) for _ in range(blocks))}, 16)


def test_three_repeated_blocks_are_a_run_of_blocks() -> None:
    # MIN_BLOCK_RUN: three blocks are a body.
    layout = _layout(_isotropic(3))
    assert layout.kind == "block" and layout.positions == _names(3, "blocks")


def test_two_repeated_layers_are_no_run_of_blocks() -> None:
    # MIN_BLOCK_RUN, from below: two stages, the second with a pair of like blocks (NASNet's pair of layers): the
    # exits follow the stages.
    second = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), Residual(8), Residual(8))
    layout = _layout(Net({"stages": nn.ModuleList([_conv(3, 8, 4), second])}, 8))
    assert layout.kind == "stage" and layout.positions == ("stages.0", "stages.1")


def _t2t() -> Net:
    # T2T-ViT-like: a stem with resolution changes of its own (4x, 8x, 16x), then eight blocks on the 16x tokens.
    stem = {f"t2t{i}": _conv(3 if i == 1 else 16, 16, 4 if i == 1 else 2) for i in (1, 2, 3)}
    return Net({**stem, "blocks": nn.ModuleList(TokenBlock(16) for _ in range(8))}, 16)


def test_blocks_after_a_stem_with_its_own_resolution_changes_take_the_exits() -> None:
    # BODY_LEAF_SHARE (T2T-ViT, HiViT, NesT): the blocks hold most of the layers, the stem's stage ends carry no exit.
    layout = _layout(_t2t())
    assert layout.kind == "block" and layout.positions == _names(8, "blocks")


def test_a_last_stage_of_repeated_blocks_does_not_make_a_hierarchical_net_isotropic() -> None:
    # BODY_LEAF_SHARE, from below (RegNetX, GhostNet, TinyViT): the last stage holds the longest run of like blocks
    # but a small share of the layers.
    first = nn.Sequential(*(m for _ in range(4) for m in (nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU())))
    last = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), Residual(8), Residual(8), Residual(8))
    parts = {"stem": nn.Conv2d(3, 8, 4, 4), "layer1": first, "layer2": _conv(8, 8, 2), "layer3": last}
    layout = _layout(Net(parts, 8))
    assert layout.kind == "stage" and layout.positions == ("layer1", "layer2", "layer3")


def test_three_stage_ends_win_over_a_run_of_blocks_inside_one_stage() -> None:
    # MIN_STAGES_OVER_BLOCKS (ShuffleNet, LeViT, PiT, Visformer): the longest run of like blocks is the middle
    # stage's; the exits follow the three stages.
    middle = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), *(Residual(8) for _ in range(4)))
    parts = {"layer1": _conv(3, 8, 4), "layer2": middle, "layer3": _conv(8, 8, 2)}
    layout = _layout(Net(parts, 8))
    assert layout.kind == "stage" and layout.positions == ("layer1", "layer2", "layer3")


def test_two_stage_ends_give_way_to_a_run_of_blocks() -> None:
    # MIN_STAGES_OVER_BLOCKS, from below (ConViT, XCiT, VOLO): blocks at one resolution, then a last downsampling
    # layer: two stage ends, and the depth is in the blocks.
    parts = {"embed": _conv(3, 8, 4), "body": nn.Sequential(*(Residual(8) for _ in range(6))), "down": _conv(8, 8, 2)}
    layout = _layout(Net(parts, 8))
    assert layout.kind == "block" and layout.positions == _names(6, "body")


def test_two_stage_ends_without_blocks_are_stages() -> None:
    # MIN_STAGES (NASNet-A and PNASNet-5 Large: two stage ends, no blocks).
    layout = _layout(Net({"stages": _stages([4, 2])}, 8))
    assert layout.kind == "stage" and layout.positions == ("stages.0", "stages.1")
    assert [p.module for p in layout.points] == ["stages.0"]


# --- _find: REAL_TRIAL_PARAMS -----------------------------------------------------------------------------------


class Large(nn.Module):
    """A small forward over more than REAL_TRIAL_PARAMS weights (never written: no memory is touched)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.empty(numel), requires_grad=False)
        self.net = Net({"stages": _stages([4, 2, 2])}, 8)

    def forward(self, x: torch.Tensor) -> Any:
        return self.net(x)


def test_a_model_over_the_real_trial_size_is_not_timed_for_real() -> None:
    # REAL_TRIAL_PARAMS.
    cpu = torch.device("cpu")
    small = Large(1)
    assert math.isfinite(_real_forward_seconds(small, small, (3, 64, 64), torch.float32, cpu))
    large = Large(100_000_000)  # REAL_TRIAL_PARAMS, and the stages' weights on top
    assert _real_forward_seconds(large, large, (3, 64, 64), torch.float32, cpu) == math.inf

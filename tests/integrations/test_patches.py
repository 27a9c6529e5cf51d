"""The DeepSpeed patches and internals the glue relies on (ds_spngd/integrations/deepspeed/patches.py): every probe
passes on the installed DeepSpeed, the installed version lies in the range pyproject.toml pins, the list names every
patch the glue makes, and the construction gate (construction.py) leaves the optimizer's step intact.

A DeepSpeed upgrade that moves or removes one of the lines a patch relies on fails ``test_patch_still_holds``, naming
the patch, the DeepSpeed function and the statement.
"""

from __future__ import annotations

import ast
import re
import warnings
from pathlib import Path

import deepspeed
import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from torch import nn

from ds_spngd.integrations.deepspeed.construction import step_disabled
from ds_spngd.integrations.deepspeed.patches import DOCUMENTED_VERSION, PATCHES, SUPPORTED_DEEPSPEED, Patch

ROOT = Path(__file__).resolve().parents[2]
GLUE = ROOT / "ds_spngd" / "integrations" / "deepspeed"
CORE = ROOT / "ds_spngd"
# the brief of issue 15: DeepSpeed internals the glue reads, each named in PATCHES
INTERNALS = ("_hp_mapping", "param_group_index", "hp_fragment_address", "lp_fragment_address",
             "single_partition_of_fp32_groups", "parallel_partitioned_bit16_groups", "bit16_groups",
             "real_dp_process_group", "get_grads_for_reduction", "lazy_init_hp_params_optimizer_state")
DEEPSPEED_OBJECTS = {"engine", "wrapper"}  # the glue's names for DeepSpeed's engine and optimizer wrapper


@pytest.mark.parametrize("patch", PATCHES, ids=[p.name for p in PATCHES])
def test_patch_still_holds(patch: Patch) -> None:
    assert patch.anchors, f"{patch.name}: no DeepSpeed line named"
    assert patch.problems() == []


@pytest.mark.skipif(deepspeed.__version__ != DOCUMENTED_VERSION, reason=f"line numbers cite {DOCUMENTED_VERSION}")
@pytest.mark.parametrize("patch", PATCHES, ids=[p.name for p in PATCHES])
def test_cited_lines_are_the_documented_versions(patch: Patch) -> None:
    for anchor in patch.anchors:
        assert anchor.line in anchor.located_lines(), (anchor.where, anchor.located_lines())


def test_installed_deepspeed_is_in_the_pinned_range() -> None:
    lines = re.findall(r'^\s*"(deepspeed[<>=!~,.\w\s]*)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"),
                       re.MULTILINE)
    assert len(lines) == 1, lines  # the one requirement line of [project] dependencies
    pinned = Requirement(lines[0])
    assert pinned.specifier == SpecifierSet(SUPPORTED_DEEPSPEED), "pyproject.toml and patches.py disagree"
    assert pinned.specifier.contains(Version(deepspeed.__version__)), (deepspeed.__version__, str(pinned.specifier))
    assert SpecifierSet(SUPPORTED_DEEPSPEED).contains(Version(DOCUMENTED_VERSION))
    assert any(s.operator == "<" for s in pinned.specifier), "the range needs an upper bound"


def _assigned_attributes(path: Path) -> set[str]:
    """Attributes the module assigns on DeepSpeed objects (``engine.x = ...``) or sets by name (``setattr(o, "x",
    ...)``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AugAssign | ast.AnnAssign) else []
        for t in targets:
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in DEEPSPEED_OBJECTS:
                found.add(t.attr)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr")
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):
            found.add(str(node.args[1].value))
    return found


def test_every_patch_the_glue_makes_is_listed() -> None:
    listed = {p.attribute for p in PATCHES if p.action in ("wraps", "sets")}
    for path in sorted(GLUE.glob("*.py")):
        unlisted = _assigned_attributes(path) - listed
        assert not unlisted, f"{path.name} patches {sorted(unlisted)} without an entry in PATCHES"


def test_every_listed_name_is_used_by_the_glue() -> None:
    source = "\n".join(p.read_text(encoding="utf-8") for p in GLUE.glob("*.py") if p.name != "patches.py")
    for patch in PATCHES:
        assert patch.attribute in source, f"PATCHES lists {patch.name}, which the glue no longer uses"
    named = " ".join(f"{p.name} {p.why}" for p in PATCHES)
    for name in INTERNALS:
        assert name in named, f"the glue reads DeepSpeed's {name}, which PATCHES does not name"


def test_the_optimizer_imports_no_deepspeed_internals() -> None:
    """ds_spngd outside integrations/ neither imports DeepSpeed nor names its internals (lines naming the
    integrations package itself, e.g. the lazy import of ``ds_spngd.initialize``, are exempt)."""
    pattern = re.compile("|".join([*map(re.escape, INTERNALS), "enable_backward_allreduce", "allreduce_gradients",
                                   r"import deepspeed", r"from deepspeed"]))
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in CORE.rglob("*.py") if "integrations" not in p.parts
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if pattern.search(line) and "integrations" not in line]
    assert hits == []


# ---- construction.step_disabled ----------------------------------------------------------------------------------
def _sgd() -> tuple[nn.Parameter, torch.optim.Optimizer]:
    p = nn.Parameter(torch.ones(3))
    return p, torch.optim.SGD([p], lr=1.0)


def test_step_disabled_is_a_no_op_and_restores_the_class_step() -> None:
    p, opt = _sgd()
    p.grad = torch.ones(3)
    with step_disabled(opt):
        assert opt.step() is None
        assert torch.equal(p, torch.ones(3))
    assert "step" not in vars(opt)
    opt.step()
    assert torch.equal(p.detach(), torch.zeros(3))


def test_step_disabled_passes_through_under_a_scheduler_built_inside() -> None:
    """DeepSpeed builds a client lr_scheduler callable (or a torch JSON scheduler at stage 0) inside
    deepspeed.initialize; torch's scheduler wraps ``optimizer.step`` on the instance (needs a bound method)."""
    p, opt = _sgd()
    with step_disabled(opt):
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        p.grad = torch.ones(3)
        opt.step()  # the wrapper's construction step: no-op
        assert torch.equal(p, torch.ones(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when the optimizer's step is no longer its tracked one
        opt.step()
        sched.step()
    assert torch.equal(p.detach(), torch.zeros(3)) and opt.param_groups[0]["lr"] == 0.5


def test_first_order_engine_with_a_client_scheduler(single_rank_env: None) -> None:
    """LARS through ds_spngd.initialize with ``lr_scheduler=callable``: DeepSpeed calls it on the client optimizer
    while the construction gate is in place (this crashed with a plain lambda as the gate)."""
    import ds_spngd

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    cfg = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8,
           "optimizer": {"type": "LARS", "params": {"lr": 0.4}}}  # fmt: skip
    engine, _, _, sched = ds_spngd.initialize(
        model=model, config=cfg, lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))
    start = [q.detach().clone() for q in model.parameters()]
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    engine.backward(nn.functional.cross_entropy(engine(x), y))
    engine.step()
    assert any(not torch.equal(q, s) for q, s in zip(model.parameters(), start, strict=True))
    assert sched.get_last_lr() == [0.2] * len(sched.get_last_lr())


def test_a_moved_line_fails_its_probe() -> None:
    """The probes themselves: what an upgrade that moved or renamed something would look like."""
    from ds_spngd.integrations.deepspeed.patches import Anchor

    engine = "deepspeed.runtime.engine"
    assert Anchor(engine, "DeepSpeedEngine.step").problem() is None
    assert "no longer contains" in str(Anchor(engine, "DeepSpeedEngine.step", "self.no_such_statement()").problem())
    assert "not found" in str(Anchor(engine, "DeepSpeedEngine.no_such_method").problem())
    assert "lacks" in str(Anchor(engine, "DeepSpeedEngine.backward", params=("no_such_param",)).problem())
    assert "defines" in str(Anchor(engine, "DeepSpeedEngine", absent="global_steps").problem())

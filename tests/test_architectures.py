"""The architectures: each one's forward against a direct computation written from its paper,
its per-task gradients against K backward passes, its published MT10 size, its routing /
attention / mixing, and its training with every aggregator, resumed exactly."""

import itertools
import json
import math

import pytest
import torch
from torch.func import vmap

from rl_mtl.agents.care import CARE
from rl_mtl.agents.moore import MOORE, gram_schmidt
from rl_mtl.agents.networks import make_network
from rl_mtl.agents.soft_modularization import SoftModularization
from rl_mtl.config import ConfigError, load_config
from rl_mtl.gradients import task_gradients, task_gradients_loop
from rl_mtl.registry import ARCHITECTURES, METHODS

TASKS = ["reach-v3", "push-v3", "pick-place-v3"]
K, B, OBS, EXTRA = 3, 5, 6, 2
NEW = ["soft_modularization", "care", "moore"]
SMALL = {  # small published-shaped settings, so the tests run in seconds
    "soft_modularization": dict(num_layers=3, num_modules=3, module_width=8, embedding_width=12, routing_width=10),
    "care": {"num_encoders": 3, "context_width": 7},
    "moore": {"num_experts": 3},
}


def _network(name, obs=OBS, extra=EXTRA, out=4, tasks=TASKS, hidden=(16, 16), options=None):
    return make_network(name, obs, extra, out, tasks, list(hidden), "default", SMALL.get(name, {}) if options is None
                        else options)  # fmt: skip


def _params(net, seed=0):
    return net.init(torch.Generator().manual_seed(seed))


def _inputs(seed=1):
    return torch.randn(K, B, OBS + EXTRA, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def _all_tasks(net, shared, task, x):
    """The batched forward the agent runs: vmap over tasks of the one-task forward."""
    return vmap(net.forward_one, in_dims=(None, 0, 0))(shared, task, x)


# -- forward passes against direct computations -----------------------------------------------------------
def _soft_modularization_direct(net, shared, task, k, x):
    """Yang et al. 2020 as their code computes it, one module and one routing entry at a time."""
    h = (
        torch.relu(x @ shared["base.weight0"].T + shared["base.bias0"]) @ shared["base.weight1"].T
        + shared["base.bias1"]
    )
    z = task["task_embedding"][k] + shared["task_embedding.bias"]
    g = torch.relu(torch.relu(z * h) @ shared["routing.weight0"].T + shared["routing.bias0"])
    g = g @ shared["routing.weight1"].T + shared["routing.bias1"]
    n, layers = net.modules, net.layers
    routes = []
    for layer in range(layers):
        if layer == 0:
            u = g
        else:
            flat = torch.cat([r.reshape(len(x), -1) for r in routes], 1)
            u = (flat @ shared[f"cond{layer}.weight"].T + shared[f"cond{layer}.bias"]) * g
        logits = torch.relu(u) @ shared[f"head{layer}.weight"].T + shared[f"head{layer}.bias"]
        if layer < layers - 1:
            routes.append(torch.softmax(logits.reshape(len(x), n, n), dim=2))
    q = torch.softmax(logits, dim=1)
    outputs = [torch.relu(h) @ shared["modules0.weight"][j].T + shared["modules0.bias"][j] for j in range(n)]
    for layer in range(1, layers):
        inputs = [torch.relu(sum(routes[layer - 1][:, i, j, None] * outputs[j] for j in range(n))) for i in range(n)]
        outputs = [
            inputs[i] @ shared[f"modules{layer}.weight"][i].T + shared[f"modules{layer}.bias"][i] for i in range(n)
        ]
    mixed = torch.relu(sum(q[:, j, None] * outputs[j] for j in range(n)))
    return mixed @ shared["out.weight"].T + shared["out.bias"]


def _moore_direct(net, shared, task, k, x):
    """Hendawy et al. 2024: E expert MLPs, orthonormalised per input (here by a QR decomposition, an
    independent route to Gram-Schmidt's vectors), mixed by the task's weights, tanh, its head."""
    layers = len(net.dims) - 1
    outs = []
    for e in range(net.experts):
        h = x
        for i in range(layers):
            h = h @ shared[f"experts.weight{i}"][e].T + shared[f"experts.bias{i}"][e]
            h = torch.relu(h) if i < layers - 1 else h
        outs.append(h)
    rows = []
    for b in range(len(x)):
        q, r = torch.linalg.qr(torch.stack([o[b] for o in outs], dim=1).double())  # [R, E]: columns in expert order
        rows.append((q * torch.sign(torch.diagonal(r))).T.float())  # Gram-Schmidt's signs: positive diagonal
    basis = torch.stack(rows)  # [B, E, R]
    v = torch.tanh((task["mixing"][k][None, :, None] * basis).sum(1))
    return v @ task["head.weight"][k].T + task["head.bias"][k]


def _care_direct(net, shared, task, k, x):
    """Sodhani et al. 2021: a context from the task's vector, attention over encoders from it, the
    mixed encoding beside the context (and the action) into the head."""

    def mlp(v, prefix, layers, last_relu=False):
        for i in range(layers):
            v = v @ shared[f"{prefix}.weight{i}"].T + shared[f"{prefix}.bias{i}"]
            v = torch.relu(v) if (i < layers - 1 or last_relu) else v
        return v

    c = torch.relu(task["context"][k])
    if net.context_file is not None:
        c = mlp(c, "projection", 2, last_relu=True)
    z_ctx = mlp(c, "context", 3)
    alpha = torch.softmax(mlp(z_ctx, "attention", 3) / net.temperature, dim=0)
    obs, action = x[:, :OBS], x[:, OBS:]
    encodings = []
    for e in range(net.encoders):
        h = torch.relu(obs @ shared["encoders.weight0"][e].T + shared["encoders.bias0"][e])
        encodings.append(h @ shared["encoders.weight1"][e].T + shared["encoders.bias1"][e])
    z_enc = sum(alpha[e] * encodings[e] for e in range(net.encoders))
    return mlp(torch.cat([z_enc, z_ctx.expand(len(x), -1), action], 1), "head", len(net.hidden_sizes) + 1)


DIRECT = {"soft_modularization": _soft_modularization_direct, "moore": _moore_direct, "care": _care_direct}


@pytest.mark.parametrize("name", NEW)
def test_the_forward_pass_is_the_papers_computation_task_by_task(name):
    net = _network(name)
    shared, task = _params(net)
    x = _inputs()
    got = _all_tasks(net, shared, task, x)
    for k in range(K):
        torch.testing.assert_close(got[k], DIRECT[name](net, shared, task, k, x[k]), rtol=1e-4, atol=1e-5)


def test_care_with_a_context_file_freezes_and_projects_it(tmp_path):
    vectors = {f"{t.rsplit('-', 1)[0]}-v1": [float(i + j) / 10 for j in range(9)] for i, t in enumerate(TASKS)}
    (tmp_path / "ctx.json").write_text(json.dumps(vectors))  # v1 names, as mtrl's file has them
    net = _network("care", options={**SMALL["care"], "context_file": str(tmp_path / "ctx.json")})
    shared, task = _params(net)
    assert torch.equal(task["context"][2], torch.tensor(vectors["pick-place-v1"]))
    x = _inputs()
    for k in range(K):
        torch.testing.assert_close(_all_tasks(net, shared, task, x)[k], _care_direct(net, shared, task, k, x[k]))
    grads = task_gradients(lambda s, t, xb: net.forward_one(s, t, xb).pow(2).mean(), shared, task, x)
    assert torch.count_nonzero(grads.task_specific["context"]) == 0, "a frozen context must get no gradient"
    assert net.describe()["sha256"] and net.describe()["context_file"].endswith("ctx.json")
    (tmp_path / "short.json").write_text(json.dumps({"reach": [1.0]}))
    with pytest.raises(ValueError, match="no list of numbers for task 'push-v3'"):
        _params(_network("care", options={"context_file": str(tmp_path / "short.json")}))


# -- per-task gradients -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [*NEW, "multihead"])
def test_per_task_gradients_equal_separate_backward_passes(name):
    net = _network(name)
    shared, task = _params(net)
    x, y = _inputs(), torch.randn(K, B, 4, generator=torch.Generator().manual_seed(2))

    def loss(s, t, batch):
        xb, yb = batch
        return (net.forward_one(s, t, xb) - yb).pow(2).mean()

    fast = task_gradients(loss, shared, task, (x, y))
    slow = task_gradients_loop(loss, shared, task, (x, y))
    torch.testing.assert_close(fast.losses, slow.losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.matrix(), slow.matrix(), rtol=1e-5, atol=1e-6)
    for key in task:
        torch.testing.assert_close(fast.task_specific[key], slow.task_specific[key], rtol=1e-5, atol=1e-6)


# -- published sizes -----------------------------------------------------------------------------------------
def _count(net):
    shared, task = _params(net)
    return sum(p.numel() for p in itertools.chain(shared.values(), task.values()))


def _components(net, prefixes):
    shared, _ = _params(net)
    return sum(p.numel() for name, p in shared.items() if name.split(".")[0] in prefixes)


MT10 = [f"task{i}" for i in range(10)]


def test_parameter_counts_at_the_published_mt10_sizes():
    """Counts of the authors' own PyTorch classes at their MT10 settings, with the 39-number
    Meta-World observation and 4 actions (policy out 8, Q in 43, out 1), counted by instantiating
    them: Soft-Module's ModularGatedCascadeCondNet (configs modular_2_2_2_256 and
    modular_4_4_2_128), MOORE's MT10 actor and critic (4 experts of 3 x 400, one head per task),
    and mtrl's CARE components (4 encoders, the attention MLP, the 3 x 400 actor head and Q head,
    and the task encoder that projects a 768-number language-model vector)."""
    sm = {"num_layers": 2, "num_modules": 2, "module_width": 256, "embedding_width": 400, "routing_width": 256}
    assert _count(make_network("soft_modularization", 39, 0, 8, MT10, [400] * 3, "default", sm)) == 691_022
    assert _count(make_network("soft_modularization", 39, 4, 1, MT10, [400] * 3, "default", sm)) == 690_823
    deep = {**sm, "num_layers": 4, "num_modules": 4, "module_width": 128}
    assert _count(make_network("soft_modularization", 39, 0, 8, MT10, [400] * 3, "default", deep)) == 792_444
    assert _count(make_network("moore", 39, 0, 8, MT10, [400] * 3, "default", {"num_experts": 4})) == 1_379_320
    assert _count(make_network("moore", 39, 4, 1, MT10, [400] * 3, "default", {"num_experts": 4})) == 1_357_650
    care = make_network("care", 39, 0, 8, MT10, [400] * 3, "default", {"num_encoders": 4})
    assert _components(care, {"encoders"}) == 18_200 and _components(care, {"attention"}) == 5_304
    assert _components(care, {"head"}) == 364_408
    q = make_network("care", 39, 4, 1, MT10, [400] * 3, "default", {"num_encoders": 4})
    assert _components(q, {"head"}) == 363_201


def test_care_s_projected_context_has_mtrl_s_task_encoder_size(tmp_path):
    (tmp_path / "lm.json").write_text(json.dumps({t: [0.1] * 768 for t in MT10}))
    care = make_network("care", 39, 0, 8, MT10, [400] * 3, "default", {"context_file": str(tmp_path / "lm.json")})
    assert _components(care, {"projection", "context"}) == 89_600


# -- routing, attention and mixing ---------------------------------------------------------------------------
def test_soft_modularization_routes_with_distributions():
    net = _network("soft_modularization")
    shared, task = _params(net)
    probs, q, _ = net.routing_weights(shared, {k: v[1] for k, v in task.items()}, _inputs()[1])
    assert len(probs) == net.layers - 1
    for p in [*probs, q]:
        assert (p >= 0).all()
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]))


def test_care_attends_with_a_distribution_per_task():
    net = _network("care")
    shared, task = _params(net)
    for k in range(K):
        alpha = net.attention(shared, net.context(shared, {n: v[k] for n, v in task.items()}))
        assert alpha.shape == (net.encoders,) and (alpha >= 0).all()
        torch.testing.assert_close(alpha.sum(), torch.tensor(1.0))


def test_moore_s_experts_are_orthonormal_for_every_input():
    net = _network("moore")
    shared, task = _params(net)
    basis, _ = net.representation(shared, {n: v[0] for n, v in task.items()}, _inputs()[0])
    gram = basis @ basis.transpose(1, 2)  # [B, E, E]
    torch.testing.assert_close(gram, torch.eye(net.experts).expand_as(gram), rtol=0, atol=1e-5)
    u = torch.randn(4, 3, 5, dtype=torch.float64)
    e = gram_schmidt(u)
    assert torch.allclose(e[:, 0], u[:, 0] / u[:, 0].norm(dim=-1, keepdim=True))  # the first keeps its direction
    assert torch.allclose((e[:, 1] * u[:, 0]).sum(-1), torch.zeros(4, dtype=u.dtype), atol=1e-12)


# -- options ---------------------------------------------------------------------------------------------------
SM, CARE_, MOORE_ = (f"agent.architecture_options.{n}" for n in ("soft_modularization", "care", "moore"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["agent.architecture=soft_modularization", f"{SM}.num_layers=1"], "num_layers must be an integer >= 2"),
        (["agent.architecture=care", f"{CARE_}.temperature=.nan"], "temperature must be a finite"),
        (["agent.architecture=care", f"{CARE_}.context_file=nope.json"], "is not a file"),
        (["agent.architecture=moore", f"{MOORE_}.num_experts=999"], "999 experts cannot be orthonormal in 32"),
        (["agent.architecture=moore", f"{MOORE_}.experts=3"], "unknown option.*valid options: num_experts"),
        (["agent.architecture_options.transformer.depth=3"], "unknown architecture.*transformer"),
    ],
)
def test_bad_architecture_options_are_explained(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", overrides)


def test_every_architecture_is_in_the_registry_and_the_config():
    assert {"shared", "multihead", "independent", *NEW} == set(ARCHITECTURES)
    for name in ARCHITECTURES:
        assert load_config("smoke", [f"agent.architecture={name}"]).agent.architecture == name
    options = load_config("smoke", [f"{CARE_}.num_encoders=6", f"{CARE_}.context_width=8"]).agent.architecture_options
    assert options == {"care": {"num_encoders": 6, "context_width": 8}}, "overrides merge per option"


def test_soft_modularization_keeps_the_published_initialisation():
    net = SoftModularization(39, 0, 8, MT10, [400], "default")
    shared, _ = _params(net)
    assert torch.all(shared["base.bias0"] == 0.1) and shared["base.weight0"].abs().max() <= 1 / math.sqrt(400)
    assert shared["out.weight"].abs().max() <= 3e-3 and shared["head0.weight"].abs().max() <= 3e-3
    assert isinstance(make_network("care", 3, 0, 2, MT10, [8], "default", {}), CARE)
    assert isinstance(make_network("moore", 3, 0, 2, MT10, [8], "default", {}), MOORE)


# -- training: every architecture with every aggregator, and exact resume ----------------------------------------
TINY = ["env.benchmark=custom", "env.tasks=[reach-v3, window-close-v3]", "env.max_episode_steps=20",
        "env.one_hot=false", "train.total_steps=60", "train.warmup_steps=20", "train.eval_every=0",
        "train.eval_episodes=1", "train.checkpoint_every=20", "train.log_every=20", "agent.hidden_sizes=[16, 16]",
        "agent.architecture_options.soft_modularization={num_modules: 2, module_width: 8, embedding_width: 16, "
        "routing_width: 8}", "agent.architecture_options.care={num_encoders: 2, context_width: 8}",
        "agent.architecture_options.moore={num_experts: 2}", "method_options.auxinash.main_task=reach-v3"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW)
def test_every_architecture_trains_with_every_aggregator_and_resumes_exactly(name, tmp_path):
    from rl_mtl.checkpoint import CHECKPOINT_NAME, load_checkpoint
    from rl_mtl.metrics import read_metrics
    from rl_mtl.train import EXIT_INTERRUPTED, run

    for method in METHODS:
        cfg = load_config("smoke", [*TINY, f"agent.architecture={name}"], method=method)
        assert run([(cfg, tmp_path / method, None)], progress=False) == 0, method
        records, _ = read_metrics(tmp_path / method / "metrics.jsonl")
        last = [r for r in records if r["kind"] == "train"][-1]
        assert all(math.isfinite(last[f"loss/critic/{t}"]) for t in ("reach-v3", "window-close-v3")), method
    cfg = load_config("smoke", [*TINY, f"agent.architecture={name}"], method="pcgrad")
    assert run([(cfg, tmp_path / "killed", None)], progress=False, stop_at_step=50) == EXIT_INTERRUPTED
    state = load_checkpoint(tmp_path / "killed" / CHECKPOINT_NAME)
    assert state["step"] == 40
    assert run([(cfg, tmp_path / "killed", state)], progress=False) == 0

    def comparable(d):
        return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in read_metrics(d / "metrics.jsonl")[0]]

    assert comparable(tmp_path / "killed") == comparable(tmp_path / "pcgrad")
    network = json.loads((tmp_path / "pcgrad" / "run.json").read_text())["network"]
    assert network["architecture"] == name


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_architecture_s_whole_update_traces_as_one_graph(name):
    """train.compile=whole and graphs need the whole population update to trace without a graph
    break for every network: here Nash-MTL's update (per-task gradients, Gramians, the solve, the
    optimiser steps), and for the shared network AuxiNash's with its held-out pass (the
    Hessian-vector products, the power step: a superset of the other methods' graph, whose tracing
    takes 2-3x longer). Traced by dynamo alone (the eager backend: no code generation), and the
    traced update gives the eager update's numbers."""
    from torch._dynamo.utils import counters

    from rl_mtl.agents import SAC, Population
    from rl_mtl.buffers import Batch

    options = f"agent.architecture_options={{{name}: {json.dumps(SMALL.get(name, {}))}}}"
    agent = load_config("smoke", [f"agent.architecture={name}", "agent.hidden_sizes=[16, 16]", options]).agent
    g = torch.Generator().manual_seed(0)

    def batch():
        rand = lambda *shape: torch.randn(2, K, B, *shape, generator=g)  # noqa: E731
        return Batch(rand(OBS), rand(3).clamp(-1, 1), rand(), rand(OBS), (rand() > 1).float())

    method, options = ("auxinash", {"main_task": TASKS[0]}) if name == "shared" else ("nashmtl", {})
    sac = SAC(OBS, 3, TASKS, agent, method, options)
    populations = [Population(sac, [0, 1], torch.device("cpu")) for _ in range(2)]
    torch._dynamo.reset()
    counters.clear()
    traced = torch.compile(populations[1]._update_and_sum, fullgraph=True, backend="eager")
    learn = sac.aggregator.learn_every > 0
    data, held_out = batch(), (batch() if learn else None)
    expected = populations[0].update(data, True, learn, held_out)
    noise, uniform, held_out_noise = populations[1].random_numbers(data, held_out)
    got = traced(populations[1].state, None, data, noise, uniform, True, learn, held_out, held_out_noise)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert not counters["graph_break"]

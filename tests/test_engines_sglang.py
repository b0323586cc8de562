"""SGLang 0.5.23's own code on our files: recorder dumps in (its count conversion), the
`--init-expert-location` file out (its parser and dispatch maps), against a real server."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from rebalancer_client.cli import main, read_loads
from rebalancer_client.engines.layers import LayerNumbering
from rebalancer_client.engines.sglang import init_expert_location, recorder_dump
from rebalancer_wire.v1 import rebalancer_pb2 as pb
from released_engines import load_sglang
from service_harness import skewed_loads


@pytest.fixture(scope="module")
def sglang():
    return load_sglang()


def recorder_file(sglang, path, *, decoder_layers, first_moe, experts, replicas, filled, buffer) -> np.ndarray:
    """A `stat`-mode dump as SGLang's recorder writes it: its own physical -> logical count conversion of a
    circular buffer with `filled` of `buffer` steps written and dense layers silent. Returns the MoE
    counts [filled, L, E] it holds."""
    rng = np.random.default_rng(7)
    physical = torch.zeros((buffer, decoder_layers, replicas), dtype=torch.int32)
    physical[:filled, first_moe:] = torch.from_numpy(
        rng.integers(0, 50, (filled, decoder_layers - first_moe, replicas))
    )
    trivial = torch.arange(replicas).repeat(decoder_layers, 1) % experts
    logical = sglang.expert_distribution._convert_global_physical_count_to_logical_count(
        physical, num_layers=decoder_layers, num_logical_experts=experts, physical_to_logical_map=trivial
    )
    torch.save({"rank": 0, "logical_count": logical, "average_utilization_rate_over_window": None}, path)
    return logical[:filled, first_moe:].numpy()


def test_recorder_dump_drops_unfilled_steps_and_keeps_decoder_rows(sglang, tmp_path):
    counts = recorder_file(
        sglang, tmp_path / "d.pt", decoder_layers=5, first_moe=1, experts=8, replicas=12, filled=3, buffer=8
    )
    loaded = read_loads(str(tmp_path / "d.pt"))
    assert loaded.shape == (3, 5, 8) and np.array_equal(loaded[:, 1:], counts)
    dump = recorder_dump(torch.load(tmp_path / "d.pt", weights_only=True))
    assert dump.dropped_steps == 5 and dump.rank == 0
    assert np.array_equal(dump.reports(LayerNumbering.dense_prefix(4, 1)), counts)


def test_recorder_dump_streams_into_a_deployment(sglang, server, tmp_path, capsys):
    counts = recorder_file(
        sglang, tmp_path / "dump.pt", decoder_layers=7, first_moe=3, experts=16, replicas=32, filled=5, buffer=16
    )
    target = ["--target", f"127.0.0.1:{server.server.port}"]
    topology = ["--replicas", "32", "--gpus", "4", "--groups", "4", "--nodes", "2"]
    code = main(["report", "sglang-dump", str(tmp_path / "dump.pt"), *topology, "--first-moe-layer", "3", *target])
    assert code == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["accepted"] == 5  # filled steps only
    deployments = server.stub.ListDeployments(pb.ListDeploymentsRequest()).deployments
    info = next(d for d in deployments if d.deployment_id == "sglang-dump")
    assert info.reports == 5 and info.topology.num_layers == counts.shape[1] == 4
    # Without the numbering the dump's 7 decoder rows are refused, not misread as MoE layers.
    assert main(["report", "sglang-dump", str(tmp_path / "dump.pt"), *target]) == 2
    assert "one row per decoder layer (7 here)" in capsys.readouterr().err


def sglang_model(decoder_layers: int, experts: int, groups: int):
    """A model config whose architecture answers SGLang's expert-location hook as DeepSeek's does."""
    location = load_sglang().expert_location.ModelConfigForExpertLocation

    class Architecture:
        @classmethod
        def get_model_config_for_expert_location(cls, config):
            return location(num_layers=decoder_layers, num_logical_experts=experts, num_groups=groups)

    return types.SimpleNamespace(architecture=Architecture, hf_config=None)


SHAPES = [
    # decoder layers, first MoE layer, experts, replicas, groups, nodes, GPUs
    (7, 3, 16, 32, 4, 2, 4),
    (4, 0, 8, 12, 1, 1, 3),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("policy", ["auto", "global", "hierarchical", "deepseek"])
def test_sglangs_parser_accepts_the_init_file_and_dispatches_every_decoder_layer(
    sglang, server, tmp_path, capsys, policy, shape
):
    decoder_layers, first_moe, experts, replicas, groups, nodes, gpus = shape
    moe_layers = decoder_layers - first_moe
    np.save(tmp_path / "loads.npy", skewed_loads(3, moe_layers, experts))
    out = tmp_path / "init.json"
    flags = ["--replicas", str(replicas), "--gpus", str(gpus), "--groups", str(groups), "--nodes", str(nodes)]
    code = main(
        ["rebalance", str(tmp_path / "loads.npy"), *flags, "--policy", policy, "--format", "sglang"]
        + ["--first-moe-layer", str(first_moe), "--out", str(out), "--target", f"127.0.0.1:{server.server.port}"]
    )
    assert code == 0, capsys.readouterr().err
    runtime = sglang.runtime
    runtime.__dict__.update(
        ep_size=gpus, nnodes=nodes, ep_num_redundant_experts=replicas - experts, init_expert_location=str(out)
    )
    location = sglang.expert_location
    for rank in (0, gpus - 1):
        metadata = location.compute_initial_expert_location_metadata(
            sglang_model(decoder_layers, experts, groups), rank
        )
        phy2log = metadata.physical_to_logical_map
        assert tuple(phy2log.shape) == (decoder_layers, replicas) and metadata.num_logical_experts == experts
        dispatch = metadata.logical_to_rank_dispatch_physical_map  # [D, E]: the slot this rank sends to
        assert tuple(dispatch.shape) == (decoder_layers, experts)
        assert torch.equal(torch.gather(phy2log, 1, dispatch), torch.arange(experts).expand(decoder_layers, -1))
        candidates = metadata.logical_to_all_physical_map
        valid = candidates >= 0
        hosted = torch.gather(phy2log, 1, candidates.clamp(min=0).flatten(1)).view(candidates.shape)
        assert bool((hosted == torch.arange(experts)[None, :, None])[valid].all())
        assert torch.equal(metadata.logical_to_all_physical_map_num_valid, valid.sum(-1))
    raw = tmp_path / "raw.json"
    code = main(
        ["rebalance", str(tmp_path / "loads.npy"), *flags, "--policy", policy, "--format", "raw"]
        + ["--out", str(raw), "--target", f"127.0.0.1:{server.server.port}"]
    )
    written = np.array(json.loads(out.read_text())["physical_to_logical_map"])
    assert written.shape == (decoder_layers, replicas)
    assert np.array_equal(written[first_moe:], np.array(json.loads(raw.read_text())["phy2log"]))  # MoE rows in place
    assert np.array_equal(written[:first_moe], np.tile(np.arange(replicas) % experts, (first_moe, 1)))


def test_sglang_file_is_refused_without_the_layer_numbering(server, tmp_path, capsys):
    np.save(tmp_path / "loads.npy", skewed_loads(3, 4, 16))
    out = tmp_path / "init.json"
    flags = ["--replicas", "32", "--gpus", "4", "--target", f"127.0.0.1:{server.server.port}"]
    assert main(["rebalance", str(tmp_path / "loads.npy"), *flags, "--format", "sglang", "--out", str(out)]) == 2
    assert "numbers its maps by decoder layer" in capsys.readouterr().err and not out.exists()
    with pytest.raises(ValueError, match="has 4 MoE layers but the layer numbering names 5"):
        init_expert_location(np.zeros((4, 32), np.int64), 16, LayerNumbering.dense_prefix(5, 3))


def test_a_lost_gpu_ships_far_fewer_copies_than_sglangs_elasticity_aware_and_can_balance_better(sglang):
    """SGLang's released policy for failed ranks re-plans from scratch on the healthy ones; the solver keeps
    what it can: at the default tolerance a fraction of SGLang's copies, at 0.002 fewer copies and better
    balance too."""
    from rebalancer.solver import maps, solve
    from rebalancer.solver.elastic import elastic_moves
    from sglang.srt.eplb.eplb_algorithms import elasticity_aware

    layers, experts, replicas, groups, nodes, gpus, lost = 6, 64, 96, 8, 2, 16, 5
    weight = torch.from_numpy(skewed_loads(3, layers, experts)).float()
    prev = solve(weight, replicas, groups, nodes, gpus).phy2log
    active = torch.ones(gpus, dtype=torch.bool)
    active[lost] = False
    healthy = active.nonzero().squeeze(1)
    theirs = elasticity_aware.rebalance_experts(weight, replicas, groups, nodes, gpus, True, active)[0]
    theirs = theirs.view(layers, gpus, -1)[:, healthy].reshape(layers, -1)
    their_moves = elastic_moves(prev, theirs, experts, replicas // gpus, healthy)[0].sum()
    their_balance = maps.balancedness(weight, theirs, maps.logcnt_from_phy2log(theirs, experts), len(healthy)).mean()
    ours = solve(weight, replicas, groups, nodes, gpus, prev_phy2log=prev, unavailable_gpus=[lost])
    tight = solve(
        weight, replicas, groups, nodes, gpus, prev_phy2log=prev, unavailable_gpus=[lost], balance_tolerance=0.002
    )
    assert torch.equal(ours.gpu_ids, healthy) and torch.equal(tight.gpu_ids, healthy)
    assert ours.moved_copies.sum() < 0.5 * their_moves
    assert tight.moved_copies.sum() < their_moves and tight.balancedness.mean() > their_balance

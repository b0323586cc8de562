"""TensorRT-LLM's `MoeLoadBalancerConfig` YAML, checked against the format its examples document: every
MoE layer keyed by decoder layer id, each a list of exactly `num_slots` expert ids."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from rebalancer_client.cli import main
from rebalancer_client.engines.layers import LayerNumbering, layer_numbering
from rebalancer_client.engines.trtllm import load_balancer_yaml
from service_harness import skewed_loads


def assert_load_balancer_config(document: dict, phy2log: np.ndarray, moe_layers, num_experts: int) -> None:
    assert set(document) == {"num_slots", "initial_global_assignments", "layer_updates_per_iter"}
    assignments = document["initial_global_assignments"]
    assert list(assignments) == list(moe_layers)  # every MoE layer, by decoder layer id, nothing else
    for layer, row in zip(moe_layers, phy2log, strict=True):
        slots = assignments[layer]
        assert isinstance(slots, list) and len(slots) == document["num_slots"] == phy2log.shape[1]
        assert slots == row.tolist() and set(slots) == set(range(num_experts))


def test_deepseek_numbering_keys_layers_3_to_60():
    phy2log = np.tile(np.arange(288) % 256, (58, 1))
    text = load_balancer_yaml(phy2log, layer_numbering(58, first_moe_layer=3), layer_updates_per_iter=2)
    document = yaml.safe_load(text)
    assert_load_balancer_config(document, phy2log, range(3, 61), 256)
    assert document["layer_updates_per_iter"] == 2 and document["num_slots"] == 288


def test_interleaved_moe_layers_and_refusals():
    phy2log = np.array([[0, 1, 2, 0], [1, 0, 2, 2]])
    numbering = LayerNumbering.parse_ids("1,3", 5)
    assert_load_balancer_config(yaml.safe_load(load_balancer_yaml(phy2log, numbering)), phy2log, [1, 3], 3)
    with pytest.raises(ValueError, match="numbers its maps by decoder layer"):
        load_balancer_yaml(phy2log, None)
    with pytest.raises(ValueError, match="has 2 MoE layers but the layer numbering names 3"):
        load_balancer_yaml(phy2log, LayerNumbering.parse_ids("1-3", 5))
    with pytest.raises(ValueError, match="must increase"):
        LayerNumbering.parse_ids("3,1", 5)
    with pytest.raises(ValueError, match="say which are MoE"):
        layer_numbering(2, num_decoder_layers=5)


def test_cli_writes_the_yaml_from_a_live_plan(server, tmp_path, capsys):
    np.save(tmp_path / "loads.npy", skewed_loads(5, 4, 16))
    out = tmp_path / "eplb.yaml"
    code = main(
        ["rebalance", str(tmp_path / "loads.npy"), "--replicas", "32", "--gpus", "4", "--format", "trtllm"]
        + ["--decoder-layers", "6", "--first-moe-layer", "1", "--layer-updates-per-iter", "1", "--out", str(out)]
        + ["--target", f"127.0.0.1:{server.server.port}"]
    )
    assert code == 0, capsys.readouterr().err
    document = yaml.safe_load(out.read_text())
    phy2log = np.array([document["initial_global_assignments"][layer] for layer in range(1, 5)])
    assert_load_balancer_config(document, phy2log, range(1, 5), 16)
    assert document["layer_updates_per_iter"] == 1

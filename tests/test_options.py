"""One declaration of the solve options: proto, solver, server, client and CLI agree with it."""

from __future__ import annotations

import inspect

import pytest
from rebalancer.service.errors import InvalidArgument
from rebalancer.service.validation import check_options
from rebalancer.solver import solve
from rebalancer_client.cli import build_parser
from rebalancer_client.messages import rebalance_request
from rebalancer_wire.options import OPTIONS, SERVICE, ArgumentError, SolveSettings, check, fill_message, read_message
from rebalancer_wire.v1 import rebalancer_pb2 as pb

LOADS = [[5.0, 1.0, 1.0, 1.0]]
TOPOLOGY = {"num_replicas": 8, "num_gpus": 4}
# One out-of-range value per option, refused alike by solver, server and client.
BAD_VALUES = {
    "policy": "fastest",
    "num_candidates": 0,
    "seed": 2**63,
    "max_moves_per_layer": -1,
    "balance_tolerance": 1.0,
    "locality_tolerance": float("nan"),
    "dry_run": 1,
    "fresh": "yes",
}


def test_every_option_is_a_field_of_the_proto_message():
    assert {option.name for option in OPTIONS} == set(pb.SolveOptions.DESCRIPTOR.fields_by_name)


def test_solver_defaults_are_the_declared_ones():
    parameters = inspect.signature(solve).parameters
    for option in OPTIONS:
        if option.scope != SERVICE:
            assert parameters[option.name].default == option.default, option.name


def test_message_round_trip_keeps_every_value():
    settings = check(
        policy="hierarchical",
        num_candidates=12,
        seed=-3,
        max_moves_per_layer=0,
        balance_tolerance=0.2,
        locality_tolerance=0.05,
        dry_run=True,
        fresh=True,
    )
    read, violations = read_message(fill_message(pb.SolveOptions(), settings))
    assert violations == [] and read == settings


def test_an_empty_message_reads_as_the_defaults():
    assert read_message(pb.SolveOptions()) == (SolveSettings(), [])


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_client_and_solver_refuse_the_same_values_naming_the_option(name):
    with pytest.raises(ArgumentError) as client_error:
        rebalance_request(LOADS, **TOPOLOGY, **{name: BAD_VALUES[name]})
    assert client_error.value.argument == name
    if next(o for o in OPTIONS if o.name == name).scope != SERVICE:
        with pytest.raises(ArgumentError) as solver_error:
            solve(LOADS, 8, 1, 1, 4, **{name: BAD_VALUES[name]})
        assert solver_error.value.argument == name


def test_server_names_the_request_field_of_each_bad_option():
    message = pb.SolveOptions(policy=99, num_candidates=5000, balance_tolerance=1.5, locality_tolerance=-0.1)
    with pytest.raises(InvalidArgument) as error:
        check_options(message)
    fields = {field for field, _ in error.value.violations}
    expected = {"options.policy", "options.num_candidates", "options.balance_tolerance", "options.locality_tolerance"}
    assert fields == expected


def test_unknown_option_is_refused_by_the_client():
    with pytest.raises(ArgumentError, match="is not a solve option"):
        rebalance_request(LOADS, **TOPOLOGY, candidates=4)


def test_cli_has_one_flag_per_option():
    parser = build_parser()
    rebalance = parser._subparsers._group_actions[0].choices["rebalance"]
    destinations = {action.dest for action in rebalance._actions}
    assert {option.name for option in OPTIONS} <= destinations

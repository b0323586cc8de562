"""`rebalancer` command line: plan placements, read and follow them, report loads, check health.

    rebalancer rebalance loads.npy --replicas 288 --groups 8 --nodes 4 --gpus 32 --out placement.json
    rebalancer get my-deployment --format sglang --out placement.json
    rebalancer watch my-deployment --format sglang --out /shared/placement.json   # rewritten per version
    rebalancer health --target 127.0.0.1:50051                                      # exit 0 iff SERVING

Loads files: `.npy`, `.json` (a nested list, or an object with `loads`, `weight` or SGLang's
`logical_count`) or `.pt` (read only when torch happens to be installed). A 3-D array [T, L, E] is T
reports: `report` sends them one by one, `rebalance` plans on their sum. SGLang recorder dumps
(`logical_count` [buffer, D, E]) lose their unfilled all-zero buffer steps. `--format` picks the engine
file (see `rebalancer_client.placement`): `vllm` (the `physical_to_logical_map` vLLM installs), `sglang`
(the `--init-expert-location` file), `trtllm` (the `MoeLoadBalancerConfig` YAML) or `raw` (everything the
service returned).

Layer numbering: placements have one row per MoE layer, SGLang and TensorRT-LLM files one per decoder
layer. `--first-moe-layer K` (dense layers first: DeepSeek-V3 is `--first-moe-layer 3`, 58 MoE layers of
61; `0` when every layer is MoE), optionally with `--decoder-layers N`, or `--decoder-layers N
--moe-layers 1,3,5-9` say which is which; the sglang and trtllm formats refuse to write without it.
SGLang dumps (one row per decoder layer) need the same flags to be cut down to their MoE rows; other
loads files have one row per MoE layer.

`--out` files are written to a temporary file in the same folder and renamed over the target, so a reader
never sees half a file; output into a closed pipe (`rebalancer get ... | head`) ends quietly.

`--target` defaults to $REBALANCER_TARGET, else 127.0.0.1:50051; a comma-separated list or a
`dns:///name:port` headless Service shards deployments over the replicas. Exit codes: 0 success, 1 an
RPC failed (or health is not SERVING), 2 bad arguments or input files.

Security: `--tls-ca ca.pem` (or $REBALANCER_TLS_CA) talks TLS and trusts that CA; `--tls-cert`/`--tls-key`
add a client certificate for servers that require mutual TLS. `--token` (prefer $REBALANCER_TOKEN, which
`ps` does not show) is sent as `authorization: Bearer <token>`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import pathlib
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np
from rebalancer_wire.options import BY_NAME, OPTIONS, Option

from .client import RebalancerClient
from .engines import sglang
from .engines.layers import LayerNumbering, layer_numbering
from .messages import field_violations
from .placement import FORMATS, Placement
from .sharding import ShardedClient, connect

DEFAULT_TARGET = "127.0.0.1:50051"


def read_loads_file(path: str) -> tuple[np.ndarray, bool]:
    """Loads from a .npy, .json or .pt file: [L, E] or [T, L, E], and whether rows are decoder layers
    (an SGLang recorder dump, of which only the filled steps are kept) rather than MoE layers."""
    suffix = pathlib.Path(path).suffix.lower()
    if suffix == ".npy":
        data: Any = np.load(path, allow_pickle=False)
    elif suffix == ".json":
        data = json.loads(pathlib.Path(path).read_text())
    elif suffix == ".pt":
        try:
            torch = importlib.import_module("torch")
        except ImportError as exc:
            raise ValueError(
                f"{path}: reading .pt files needs torch, which is not installed; use .npy or .json"
            ) from exc
        data = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{path}: loads must be a .npy, .json or .pt file")
    by_decoder_layer = sglang.is_recorder_dump(data)
    if by_decoder_layer:
        dump = sglang.recorder_dump(data)
        if dump.dropped_steps:
            print(f"{path}: dropped {dump.dropped_steps} unfilled recorder steps", file=sys.stderr)
        if not len(dump.logical_count):
            raise ValueError(f"{path}: the recorder dump holds no filled step")
        data = dump.logical_count
    elif isinstance(data, dict):
        key = next((k for k in ("loads", "weight") if k in data), None)
        if key is None:
            raise ValueError(f"{path}: expected a key loads, weight or logical_count, found {sorted(data)}")
        data = data[key]
    if hasattr(data, "detach"):
        data = data.detach().cpu().double().numpy()
    array = np.asarray(data)
    if array.ndim not in (2, 3):
        raise ValueError(
            f"{path}: loads must be [layers, experts] or [reports, layers, experts], got {list(array.shape)}"
        )
    return array, by_decoder_layer


def read_loads(path: str) -> np.ndarray:
    """Loads from a .npy, .json or .pt file: [L, E], or [T, L, E] for T reports (SGLang dumps: filled steps)."""
    return read_loads_file(path)[0]


def write_text(text: str, out: str | None) -> None:
    """Text to stdout, or atomically to `out`: a temporary file in the same folder, flushed to disk, then
    renamed over `out`, so a reader (an engine, a watcher) sees the old file or the new one, never half.
    The file gets the permissions a plain `open(out, "w")` would (temporary files are private)."""
    if not out:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    target = pathlib.Path(out)
    umask = os.umask(0)
    os.umask(umask)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(document: Any, out: str | None) -> None:
    """One JSON document (one line) to stdout or atomically to `out`."""
    write_text(json.dumps(document, separators=(",", ":")) + "\n", out)


def output_numbering(args: argparse.Namespace, num_moe_layers: int) -> LayerNumbering | None:
    """The decoder-layer numbering of an engine file from the layer flags (None when none was given)."""
    return layer_numbering(
        num_moe_layers,
        num_decoder_layers=args.decoder_layers,
        first_moe_layer=args.first_moe_layer,
        moe_layers=args.moe_layers,
    )


def input_moe_rows(args: argparse.Namespace, path: str) -> np.ndarray:
    """A loads file as MoE rows [..., L, E]: SGLang dumps (one row per decoder layer) are cut down with the
    layer flags, which they require; other files already have one row per MoE layer."""
    loads, by_decoder_layer = read_loads_file(path)
    if not by_decoder_layer:
        return loads
    if args.first_moe_layer is None and args.moe_layers is None:
        raise ValueError(
            f"{path}: SGLang dumps have one row per decoder layer ({loads.shape[-2]} here): say which are MoE "
            "with --first-moe-layer K (0 when every layer is MoE) or --moe-layers IDS"
        )
    decoder_layers = loads.shape[-2]
    if args.decoder_layers not in (None, decoder_layers):
        raise ValueError(f"{path}: the dump has {decoder_layers} decoder layers, not {args.decoder_layers}")
    if args.moe_layers is not None:
        numbering = LayerNumbering.parse_ids(args.moe_layers, decoder_layers)
    else:
        numbering = LayerNumbering(decoder_layers, tuple(range(args.first_moe_layer, decoder_layers)))
    return numbering.select(loads, path)


def render(placement: Placement, args: argparse.Namespace, format: str) -> str:
    """The engine file for `placement` in `format`, with the layer numbering and options from the flags."""
    numbering = output_numbering(args, placement.phy2log.shape[0])
    options = {"layer_updates_per_iter": args.layer_updates_per_iter} if format == "trtllm" else {}
    return placement.to_text(format, numbering, **options)


def describe(placement: Placement) -> str:
    """One line a human reads after a rebalance."""
    stats = placement.stats
    state = f"version {placement.version}" + (" committed" if placement.committed else " not committed")
    if not placement.deployment_id:
        state = "inline plan"
    policies = ", ".join(f"{name}: {layers}" for name, layers in sorted(stats.policies.items()))
    return (
        f"{state}; balancedness {stats.balancedness_before:.4f} -> {stats.balancedness_after:.4f}; "
        f"{stats.replicas_moved} copies moved; solved in {stats.solve_seconds * 1e3:.1f} ms on "
        f"{stats.device or '?'}" + (f"; policies {policies}" if policies else "")
    )


def _summary(placement: Placement) -> dict[str, Any]:
    return {
        "deployment_id": placement.deployment_id,
        "version": placement.version,
        "trigger": placement.trigger,
        "created_unix_ms": placement.created_unix_ms,
        "balancedness": placement.stats.balancedness_after,
        "replicas_moved": placement.stats.replicas_moved,
    }


def _layer_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("layer numbering (decoder layers vs MoE layers)")
    group.add_argument("--decoder-layers", type=int, help="the model's total decoder layers (DeepSeek-V3: 61)")
    group.add_argument("--first-moe-layer", type=int, help="decoder layer id of the first MoE layer (DeepSeek-V3: 3)")
    group.add_argument("--moe-layers", help="explicit decoder layer ids of the MoE layers, e.g. 3-60 or 1,3,5-9")


def _output_args(parser: argparse.ArgumentParser, formats: Sequence[str], default: str) -> None:
    parser.add_argument("--out", help="write the file here (atomically) instead of stdout")
    parser.add_argument("--format", choices=formats, default=default, help="file form (default %(default)s)")
    parser.add_argument(
        "--layer-updates-per-iter",
        type=int,
        default=0,
        help="trtllm: layers TensorRT-LLM's own balancer may update per iteration (0: static placement)",
    )
    _layer_args(parser)


def _topology_args(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--replicas", type=int, required=required, help="R: physical expert slots per layer")
    parser.add_argument("--groups", type=int, default=1, help="expert groups (1 when the model has none)")
    parser.add_argument("--nodes", type=int, default=1, help="server nodes")
    parser.add_argument("--gpus", type=int, required=required, help="G: GPUs holding a layer's slots")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target",
        default=os.environ.get("REBALANCER_TARGET", DEFAULT_TARGET),
        help="host:port, a comma list or dns:///name:port (default: $REBALANCER_TARGET, now %(default)s)",
    )
    common.add_argument("--timeout", type=float, default=30.0, help="deadline of each call in seconds")
    common.add_argument(
        "--token", default=os.environ.get("REBALANCER_TOKEN"), help="bearer token (default: $REBALANCER_TOKEN)"
    )
    common.add_argument(
        "--tls-ca",
        default=os.environ.get("REBALANCER_TLS_CA"),
        help="PEM CA bundle to verify the server with; turns TLS on (default: $REBALANCER_TLS_CA)",
    )
    common.add_argument("--tls-cert", help="PEM client certificate, for servers requiring mutual TLS")
    common.add_argument("--tls-key", help="PEM private key of --tls-cert")

    parser = argparse.ArgumentParser(prog="rebalancer", description="Client of the MoE expert-placement rebalancer.")
    commands = parser.add_subparsers(dest="command", required=True)

    rebalance = commands.add_parser("rebalance", parents=[common], help="plan a placement")
    rebalance.add_argument(
        "loads", nargs="?", help="loads file (.npy/.json/.pt); omit with --deployment to use its window"
    )
    _topology_args(rebalance, required=False)
    _option_args(rebalance)
    rebalance.add_argument("--deployment", help="plan for this deployment and commit a new version")
    rebalance.add_argument("--base-version", type=int, help="fail unless this is the current version")
    rebalance.add_argument(
        "--unavailable-gpus", type=int, nargs="+", help="failed GPU ids: plan on the healthy GPUs only (elastic EP)"
    )
    _cost_args(rebalance, "this rebalance's cost model (unset: the deployment's)")
    _output_args(rebalance, FORMATS, "vllm")

    get = commands.add_parser("get", parents=[common], help="print the placement in force for a deployment")
    get.add_argument("deployment")
    _output_args(get, FORMATS, "vllm")

    watch = commands.add_parser("watch", parents=[common], help="follow new placement versions")
    watch.add_argument("deployment")
    watch.add_argument("--after-version", type=int, default=0)
    watch.add_argument("--count", type=int, help="stop after this many versions")
    _output_args(watch, ("summary", *FORMATS), "summary")

    health = commands.add_parser("health", parents=[common], help="exit 0 when SERVING, 1 otherwise")
    health.add_argument("--service", default="", help='health service name ("" for the whole server)')
    health.set_defaults(timeout=3.0)

    report = commands.add_parser("report", parents=[common], help="stream loads files as telemetry")
    report.add_argument("deployment")
    report.add_argument("loads", nargs="+", help="loads files; [T, L, E] arrays are T reports")
    _topology_args(report, required=False)
    _cost_args(report, "the cost model registered with the deployment (first report)")
    report.add_argument("--rank", type=int, default=0)
    _layer_args(report)

    advise = commands.add_parser(
        "advise", parents=[common], help="balancedness each slots-per-GPU count would reach on the same loads"
    )
    advise.add_argument("loads", nargs="?", help="loads file; omit with --deployment to use its window")
    advise.add_argument("--gpus", type=int, help="G: GPUs holding a layer's slots (inline loads)")
    advise.add_argument("--groups", type=int, default=1, help="expert groups (1 when the model has none)")
    advise.add_argument("--nodes", type=int, default=1, help="server nodes")
    advise.add_argument("--deployment", help="advise on this deployment's layout and window")
    advise.add_argument("--slots", type=int, nargs="+", help="slots per GPU to try (default: 5 from the smallest)")
    for option in ("policy", "num_candidates", "seed"):
        _option_arg(advise, BY_NAME[option])

    commands.add_parser("list", parents=[common], help="list deployments")
    delete = commands.add_parser("delete", parents=[common], help="forget a deployment")
    delete.add_argument("deployment")
    return parser


# The transfer cost model: a deployment's (registered with its topology) or a rebalance's override.
COST_FLAGS = {
    "bytes_per_expert": "bytes of one expert copy, for the transfer plan's cost",
    "intra_node_bandwidth": "bytes/s each GPU moves within its node (NVLink)",
    "inter_node_bandwidth": "bytes/s each GPU moves across nodes (NIC)",
}


def _cost_args(parser: argparse.ArgumentParser, scope: str) -> None:
    for name, doc in COST_FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=float, help=f"{doc}; {scope}")


def _cost_model(args: argparse.Namespace) -> dict[str, float]:
    """The cost flags given (the others are left to the deployment or the defaults)."""
    return {name: getattr(args, name) for name in COST_FLAGS if getattr(args, name) is not None}


def _option_args(parser: argparse.ArgumentParser) -> None:
    """One flag per declared solve option; unset flags send nothing, so the server's defaults apply."""
    for option in OPTIONS:
        _option_arg(parser, option)


def _option_arg(parser: argparse.ArgumentParser, option: Option) -> None:
    if option.kind is bool:
        parser.add_argument(option.cli_flag, dest=option.name, action="store_true", default=None, help=option.doc)
    else:
        choices = option.choices or None
        help_text = f"{option.doc} (default: {option.default})" if option.default is not None else option.doc
        parser.add_argument(option.cli_flag, dest=option.name, type=option.kind, choices=choices, help=help_text)


def _window_sum(loads: np.ndarray) -> np.ndarray:
    """[L, E] loads, summing the reports of a [T, L, E] file."""
    return loads.sum(axis=0) if loads.ndim == 3 else loads


def _rebalance(client: RebalancerClient | ShardedClient, args: argparse.Namespace) -> int:
    placement = client.rebalance(
        _window_sum(input_moe_rows(args, args.loads)) if args.loads else None,
        num_replicas=args.replicas,
        num_groups=args.groups,
        num_nodes=args.nodes,
        num_gpus=args.gpus,
        deployment_id=args.deployment,
        base_version=args.base_version,
        unavailable_gpus=args.unavailable_gpus,
        cost_model=_cost_model(args),
        timeout=args.timeout,
        **{option.name: getattr(args, option.name) for option in OPTIONS},
    )
    text = render(placement, args, args.format)  # a refused engine file fails before anything is printed
    write_text(text, args.out)
    print(describe(placement), file=sys.stderr)
    return 0


def _advise(client: RebalancerClient | ShardedClient, args: argparse.Namespace) -> int:
    counts = client.advise_slots(
        _window_sum(read_loads(args.loads)) if args.loads else None,
        num_gpus=args.gpus,
        num_groups=args.groups,
        num_nodes=args.nodes,
        deployment_id=args.deployment,
        slots_per_gpu=args.slots or (),
        timeout=args.timeout,
        policy=args.policy,
        num_candidates=args.num_candidates,
        seed=args.seed,
    )
    print("slots/GPU\tslots\tbalancedness\tworst layer")
    for count in counts:
        print(
            f"{count.slots_per_gpu}\t{count.num_replicas}\t{count.balancedness:.4f}\t"
            f"{count.worst_layer_balancedness:.4f}"
        )
    return 0


def _watch(client: RebalancerClient | ShardedClient, args: argparse.Namespace) -> int:
    for seen, placement in enumerate(client.watch(args.deployment, args.after_version), start=1):
        if args.format == "summary":
            write_json(_summary(placement), args.out)
        else:
            write_text(render(placement, args, args.format), args.out)
        if args.out:
            print(f"wrote version {placement.version} to {args.out}", file=sys.stderr)
        sys.stdout.flush()
        if args.count is not None and seen >= args.count:
            break
    return 0


def _health(client: RebalancerClient | ShardedClient, args: argparse.Namespace) -> int:
    try:
        status = client.health(args.service, timeout=args.timeout)
    except grpc.RpcError as exc:
        status = exc.code().name
    statuses = status if isinstance(status, dict) else {args.target: status}
    for target, value in statuses.items():
        print(value if len(statuses) == 1 else f"{target} {value}")
    return 0 if all(value == "SERVING" for value in statuses.values()) else 1


def _report(client: RebalancerClient | ShardedClient, args: argparse.Namespace) -> int:
    reports: list[np.ndarray] = []
    for path in args.loads:
        array = input_moe_rows(args, path)
        reports += list(array) if array.ndim == 3 else [array]
    topology = None
    if args.replicas is not None or args.gpus is not None:
        topology = {
            "num_replicas": args.replicas,
            "num_groups": args.groups,
            "num_nodes": args.nodes,
            "num_gpus": args.gpus,
            "cost_model": _cost_model(args) or None,
        }
    summary = client.report_loads(args.deployment, reports, topology=topology, rank=args.rank, timeout=args.timeout)
    write_json({"accepted": summary.accepted, "rejected": summary.rejected, "rejections": summary.rejections}, None)
    return 0 if summary.rejected == 0 else 1


def channel_credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS credentials from --tls-ca/--tls-cert/--tls-key, or None for a plaintext channel."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if not args.tls_ca and not args.tls_cert:
        return None
    ca = pathlib.Path(args.tls_ca).read_bytes() if args.tls_ca else None
    key = pathlib.Path(args.tls_key).read_bytes() if args.tls_key else None
    chain = pathlib.Path(args.tls_cert).read_bytes() if args.tls_cert else None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=chain)


def run(args: argparse.Namespace) -> int:
    """Execute parsed arguments; gRPC and input errors propagate to `main`."""
    credentials = channel_credentials(args)
    with connect(args.target, args.timeout, token=args.token, credentials=credentials) as client:
        if args.command == "rebalance":
            return _rebalance(client, args)
        if args.command == "get":
            placement = client.get_placement(args.deployment, timeout=args.timeout)
            write_text(render(placement, args, args.format), args.out)
            return 0
        if args.command == "watch":
            return _watch(client, args)
        if args.command == "health":
            return _health(client, args)
        if args.command == "report":
            return _report(client, args)
        if args.command == "advise":
            return _advise(client, args)
        if args.command == "list":
            for info in client.list_deployments(timeout=args.timeout):
                shape = info.topology
                print(
                    f"{info.deployment_id}\tversion {info.version}\treports {info.reports}\t"
                    f"imbalance {info.imbalance:.4f}\tL={shape.num_layers} E={shape.num_experts} "
                    f"R={shape.num_replicas} G={shape.num_gpus}"
                )
            return 0
        deleted = client.delete_deployment(args.deployment, timeout=args.timeout)
        print("deleted" if deleted else "not found")
        return 0 if deleted else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point `rebalancer`; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except BrokenPipeError:
        # The reader left (`| head`): nothing more to say, and nothing to flush at exit either.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError) as exc:
        print(f"rebalancer: error: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"rebalancer: {exc.code().name}: {exc.details()}", file=sys.stderr)
        for field, description in field_violations(exc):
            print(f"  {field}: {description}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

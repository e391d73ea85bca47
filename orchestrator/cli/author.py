"""The capsule author's verbs: run a plain Extism plugin, check and call one capsule folder.

    orch wasm call FILE FUNCTION [--input TEXT | --input -] [--config KEY=VALUE]...
                   [--fuel N] [--timeout-ms N] [--memory-mib N] [--wasi]
                   [--cache-dir DIR] [--stats]
    orch capsule check DIR
    orch capsule call DIR TOOL [JSON | -] [--state-dir DIR] [--workspace DIR] [--config KEY=VALUE]...

`wasm call` is like `extism call`: the output bytes go to stdout; a failed call prints one
line to stderr and exits 1; bad usage or an unreadable or invalid module exits 2;
`--stats` prints `{"fuel_used": N, "seconds": S}` to stderr. Part of the CLI: it prints.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from ..errors import CapsuleError, InvalidModule, OrchestratorError
from .output import EXIT_FAILED, EXIT_OK, EXIT_USAGE, fail, one_line, print_problems


def _config_pairs(items: list[str]) -> dict[str, str]:
    config: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--config expects KEY=VALUE, got {item!r}")
        config[key] = value
    return config


def wasm_call(args: argparse.Namespace) -> int:
    from ..engine import Limits, WasmEngine

    try:
        config = _config_pairs(args.config)
    except ValueError as error:
        return fail(str(error), EXIT_USAGE, colors=args.colors)
    defaults = Limits()
    try:
        limits = Limits(
            fuel=args.fuel or defaults.fuel,
            memory_mib=args.memory_mib or defaults.memory_mib,
            timeout_ms=args.timeout_ms or defaults.timeout_ms,
        )
    except ValueError as error:
        return fail(str(error), EXIT_USAGE, colors=args.colors)
    data = sys.stdin.buffer.read() if args.input == "-" else args.input.encode()
    engine = WasmEngine(cache_dir=args.cache_dir)
    try:
        plugin = engine.load(Path(args.file), name=Path(args.file).stem, config=config, limits=limits, wasi=args.wasi)
    except InvalidModule as error:
        return fail(one_line(error), EXIT_USAGE, colors=args.colors)
    started = time.perf_counter()
    fuel_used = 0
    try:
        output, fuel_used = plugin.call_metered(args.function, data)
    except CapsuleError as error:
        fuel_used = error.fuel_used
        return fail(one_line(error), EXIT_FAILED, colors=args.colors)
    finally:
        if args.stats:
            stats = {"fuel_used": fuel_used, "seconds": round(time.perf_counter() - started, 6)}
            print(json.dumps(stats), file=sys.stderr)
        plugin.close()
        engine.close()
    sys.stdout.buffer.write(output)
    sys.stdout.buffer.flush()
    return EXIT_OK


def capsule_check(args: argparse.Namespace) -> int:
    from ..capsule.binding import bind_airlocks
    from ..capsule.capsule import check_exports
    from ..desired.load import read_component
    from ..desired.manifest import load_manifest, mask_config, resolve_config
    from ..engine import WasmEngine
    from ..errors import ManifestError

    folder: Path = args.dir
    try:
        manifest = load_manifest(folder)
    except ManifestError as error:
        return print_problems(folder, [str(p) for p in error.problems], colors=args.colors)
    manifest_file = str(folder / "Capsule.toml")
    problems: list[str] = []
    config: dict[str, str] = {}
    try:
        config = resolve_config(manifest, {}, source=manifest_file)
    except ManifestError as error:
        problems += [str(p) for p in error.problems]
    digest = ""
    try:
        wasm, digest, _, _ = read_component(folder, manifest)
        with WasmEngine() as engine:
            plugin = engine.load(
                wasm, digest=digest, name=manifest.package.name, wasi=True, host_functions=bind_airlocks()
            )
            try:
                check_exports(manifest, plugin, manifest_file)
            finally:
                plugin.close()
    except ManifestError as error:
        problems += [str(p) for p in error.problems]
    except InvalidModule as error:
        problems.append(f"{folder / manifest.component.file}: {one_line(error)}")
    if problems:
        return print_problems(folder, problems, colors=args.colors)
    package, caps = manifest.package, manifest.capabilities
    print(f"{package.name} {package.version}: {package.description or '(no description)'}")
    print(f"  wasm          {manifest.component.file}  sha256:{digest}")
    for tool in manifest.tools:
        print(f"  tool          {tool.name}: {tool.description}")
    for interceptor in manifest.interceptors:
        print(f"  interceptor   {interceptor.event} -> {interceptor.action} (priority {interceptor.priority})")
    print("may touch:")
    print(f"  kv            {'yes (its own keys)' if caps.kv else 'no'}")
    for label, items in (
        ("read files", caps.fs_read),
        ("write files", caps.fs_write),
        ("publish", caps.ipc_publish),
        ("subscribe", caps.ipc_subscribe),
        ("network", caps.net),
    ):
        print(f"  {label:<13} {', '.join(items) if items else 'nothing'}")
    shown = mask_config(manifest, config)
    for key, declared in manifest.env.items():
        print(f"  config        {key} ({declared.type}) = {shown.get(key, '(unset)')}")
    return EXIT_OK


def capsule_call(args: argparse.Namespace) -> int:

    try:
        config = _config_pairs(args.config)
    except ValueError as error:
        return fail(str(error), EXIT_USAGE, colors=args.colors)
    text = sys.stdin.read() if args.arguments == "-" else args.arguments
    try:
        arguments = json.loads(text) if text.strip() else None
    except ValueError as error:
        return fail(f"the arguments are not valid JSON: {error}", EXIT_FAILED, colors=args.colors)
    try:
        output = asyncio.run(_call_capsule_tool(args, config, arguments))
    except OrchestratorError as error:
        return fail(one_line(error), EXIT_FAILED, colors=args.colors)
    sys.stdout.buffer.write(output)
    sys.stdout.buffer.flush()
    return EXIT_OK


async def _call_capsule_tool(args: argparse.Namespace, config: dict[str, str], arguments: object) -> bytes:
    from ..capsule import Capsule, EventBus, KVStore
    from ..capsule.protected import ProtectedPaths
    from ..control.statedir import CACHE, CACHE_KEY, KV_DATABASE, StateDir
    from ..engine import WasmEngine, load_or_create_key

    lock = await asyncio.to_thread(StateDir.open, args.state_dir)  # never beside a running orchestrator
    state_dir = lock.path
    try:
        store = await KVStore.open(state_dir / KV_DATABASE)
    except BaseException:
        lock.close()
        raise
    bus = EventBus()
    engine = WasmEngine(cache_dir=state_dir / CACHE, cache_key=load_or_create_key(state_dir / CACHE_KEY))
    capsule = None
    try:
        protected = ProtectedPaths.build(state_dir=state_dir, cache_dir=state_dir / CACHE, capsule_folders=[args.dir])
        capsule = await Capsule.load(
            args.dir, engine=engine, bus=bus, store=store, workspace=args.workspace, config=config, protected=protected
        )
        result = await capsule.call_tool(args.tool, arguments)
        return result.output
    finally:
        if capsule is not None:
            await capsule.close()
        await store.close()
        engine.close()
        bus.close()
        lock.close()

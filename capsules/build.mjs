// Builds the example capsules: capsules/<name>/assembly/index.ts -> capsules/<name>/<name>.wasm
//
//   node build.mjs [--dev | --release] [--out DIR] [--jobs N] [name ...]
//
// The profiles are the SDK's (sdk/build.mjs): --release (the default: `npm run build`,
// `make capsules`, the committed .wasm files, and the freshness test, which uses --out to
// write elsewhere) and --dev (each example's `[build] command`, run by the orchestrator's
// watcher when a source changes). One capsule is compiled in this process; several run in
// parallel child processes (--jobs, default: the number of CPUs), each printing its result
// when it is done. A failure prints the compiler's messages only; the exit code is 1.
import { execFile } from "node:child_process";
import { existsSync, readdirSync } from "node:fs";
import { availableParallelism } from "node:os";
import { dirname, join, resolve } from "node:path";
import { performance } from "node:perf_hooks";
import { fileURLToPath } from "node:url";
import { build } from "./sdk/build.mjs";

const root = dirname(fileURLToPath(import.meta.url));
const USAGE = "usage: node build.mjs [--dev | --release] [--out DIR] [--jobs N] [name ...]";

function parse(args) {
  const options = { profile: "release", outDir: null, jobs: availableParallelism(), names: [] };
  for (let i = 0; i < args.length; i++) {
    const arg = args[i];
    if (arg === "--dev" || arg === "--release") options.profile = arg.slice(2);
    else if (arg === "--out" && i + 1 < args.length) options.outDir = args[++i];
    else if (arg === "--jobs" && /^[1-9][0-9]*$/.test(args[i + 1] ?? "")) options.jobs = Number(args[++i]);
    else if (arg.startsWith("-")) throw new Error(`unexpected argument ${JSON.stringify(arg)}`);
    else options.names.push(arg);
  }
  return options;
}

const examples = () =>
  readdirSync(root, { withFileTypes: true })
    .filter((d) => d.isDirectory() && existsSync(join(root, d.name, "assembly", "index.ts")))
    .map((d) => d.name)
    .sort();

/** Builds one example in a child process (so several use several cores). */
function buildApart(entry, outFile, profile) {
  return new Promise((done) => {
    const args = [join(root, "sdk", "build.mjs"), `--${profile}`, "--out", outFile, entry];
    execFile(process.execPath, args, { cwd: root, maxBuffer: 16 << 20 }, (error, stdout, stderr) => {
      done({ ok: !error, output: stdout + stderr });
    });
  });
}

async function main() {
  let options;
  try {
    options = parse(process.argv.slice(2));
  } catch (error) {
    process.stderr.write(`${error.message}\n${USAGE}\n`);
    return 2;
  }
  const all = examples();
  const unknown = options.names.filter((name) => !all.includes(name));
  if (unknown.length) {
    process.stderr.write(`no example capsule named ${unknown.join(", ")} (there are: ${all.join(", ")})\n`);
    return 2;
  }
  const names = options.names.length ? options.names : all;
  const target = (name) =>
    resolve(options.outDir ?? join(root, name), `${name}.wasm`);
  const entry = (name) => join(name, "assembly", "index.ts");
  let failed = 0;

  if (names.length === 1) {
    const [name] = names;
    const { ok, output } = await build({ entry: entry(name), outFile: target(name), profile: options.profile, baseDir: root });
    const seconds = (performance.now() / 1000).toFixed(2);
    if (ok) process.stdout.write(`${output}built ${target(name)} (${options.profile}, ${seconds} s)\n`);
    else process.stderr.write(`${output}build failed: ${name} (${options.profile}, ${seconds} s)\n`);
    return ok ? 0 : 1;
  }

  const queue = [...names];
  const worker = async () => {
    for (let name = queue.shift(); name !== undefined; name = queue.shift()) {
      const { ok, output } = await buildApart(entry(name), target(name), options.profile);
      if (ok) process.stdout.write(output);
      else {
        failed++;
        process.stderr.write(output);
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(options.jobs, names.length) }, worker));
  const seconds = (performance.now() / 1000).toFixed(2);
  const summary = `${names.length - failed} of ${names.length} built (${options.profile}, ${seconds} s)\n`;
  (failed ? process.stderr : process.stdout).write(summary);
  return failed ? 1 : 0;
}

process.exitCode = await main().catch((error) => {
  process.stderr.write(`build failed: ${error?.message ?? error}\n`);
  return 1;
});

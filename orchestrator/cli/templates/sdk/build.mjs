#!/usr/bin/env node
// Builds one capsule: its AssemblyScript entry file -> its .wasm, with one of two profiles.
//
//   node sdk/build.mjs [--dev | --release] [--out FILE] [ENTRY]      (run in the capsule folder)
//
//   --release  (the default) optimised: what you commit and ship. -O3 costs seconds of CPU.
//   --dev      unoptimised, with a name section: for the edit-save-reload loop (a capsule's
//              `[build] command`). It behaves like the release build: same runtime (so the
//              same memory behaviour), same assertion setting; only speed and size differ.
//   --out      the .wasm to write; default: the `file` of the [[component]] in ./Capsule.toml
//   ENTRY      default: assembly/index.ts
//
// On success it prints `built <file> (<profile>, <seconds> s)`. On failure it prints the
// compiler's own messages (file, line, a code frame) and `build failed: ...`, exits 1, and
// leaves the previous .wasm in place. The .wasm is written to a temporary file and renamed,
// so a watcher never sees half of it.
//
// Needs `npm install` in the capsule folder (assemblyscript, @extism/as-pdk and this SDK,
// installed as the package `orch-capsule-sdk`). Other build scripts import `build` from here.
import { existsSync, mkdirSync, readFileSync, realpathSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { basename, dirname, join, resolve } from "node:path";
import { performance } from "node:perf_hooks";
import { pathToFileURL } from "node:url";

export const SDK_PACKAGE = "orch-capsule-sdk";

// Shared by both profiles. `--use abort=…` routes AssemblyScript's `abort` (a failed
// assertion, an uncaught throw) to the SDK's handler (abort.ts), which sets the call's error
// message instead of importing `env.abort` (which no Extism host provides).
const COMMON = ["--noAssert", "--runtime", "incremental", "--use", `abort=~lib/${SDK_PACKAGE}/abort/capsuleAbort`];

export const PROFILES = {
  // binaryen's -O3: 1-2 s more per capsule, a smaller and faster module.
  release: ["--optimizeLevel", "3", "--shrinkLevel", "0", ...COMMON],
  // No optimisation passes at all; --debug keeps function names, so a trap names its function.
  dev: ["--optimizeLevel", "0", "--shrinkLevel", "0", "--debug", ...COMMON],
};

const USAGE = "usage: node build.mjs [--dev | --release] [--out FILE] [ENTRY]";

/** The `file` of the [[component]] table of `<folder>/Capsule.toml`, or null. */
export function componentFile(folder) {
  let text;
  try {
    text = readFileSync(join(folder, "Capsule.toml"), "utf8");
  } catch {
    return null;
  }
  let table = "";
  for (const line of text.split(/\r?\n/)) {
    const header = line.match(/^\s*\[\[?\s*([A-Za-z0-9_.-]+)\s*\]\]?\s*(#.*)?$/);
    if (header) {
      table = header[1];
      continue;
    }
    const file = table === "component" && line.match(/^\s*file\s*=\s*(?:"([^"\\]*)"|'([^']*)')\s*(#.*)?$/);
    if (file) return file[1] ?? file[2];
  }
  return null;
}

/** Where `node_modules/<name>` is, looking up from `folder` as Node and asc do, or null. */
function installed(folder, name) {
  for (let dir = resolve(folder); ; dir = dirname(dir)) {
    if (existsSync(join(dir, "node_modules", name, "package.json"))) return join(dir, "node_modules", name);
    if (dirname(dir) === dir) return null;
  }
}

/** Writes `bytes` to `target` through a temporary file in the same folder and a rename. */
function writeAtomically(target, bytes) {
  mkdirSync(dirname(target), { recursive: true });
  const temporary = join(dirname(target), `.${basename(target)}.${process.pid}.tmp`);
  try {
    writeFileSync(temporary, bytes);
    renameSync(temporary, target);
  } catch (error) {
    rmSync(temporary, { force: true });
    throw error;
  }
}

/**
 * Compiles `entry` (relative to `baseDir`) into `outFile` with `profile` ("dev" or "release").
 * Resolves to { ok, output }: `output` holds the compiler's messages (warnings too); on
 * failure nothing is written. Never throws for a compile error.
 */
export async function build({ entry, outFile, profile = "release", baseDir = process.cwd() }) {
  const flags = PROFILES[profile];
  if (!flags) return { ok: false, output: `unknown profile ${JSON.stringify(profile)}: dev or release\n` };
  if (!installed(baseDir, SDK_PACKAGE) || !installed(baseDir, "assemblyscript")) {
    return {
      ok: false,
      output: `the build tools are not installed in ${resolve(baseDir)}: run \`npm install\` there (it installs assemblyscript, @extism/as-pdk and ${SDK_PACKAGE})\n`,
    };
  }
  const asc = await import(pathToFileURL(join(installed(baseDir, "assemblyscript"), "dist", "asc.js")).href);
  let binary = null;
  const outputs = [];
  const stream = { write: (chunk) => { outputs.push(String(chunk)); return true; } };
  // The output is captured for a log line or a build_failed event: colour only for a person at a
  // terminal (asc itself colours whenever a CI variable is set, whatever the output is).
  const colours = process.stderr.isTTY && !("NO_COLOR" in process.env) ? [] : ["--noColors"];
  const result = await asc.main([entry, "--baseDir", baseDir, "--outFile", outFile, ...flags, ...colours], {
    stdout: stream,
    stderr: stream,
    writeFile: (name, contents) => {
      if (resolve(baseDir, name) === resolve(baseDir, outFile)) binary = contents;
    },
  });
  let output = outputs.join("");
  if (result.error) {
    if (output.trim() === "") output = `${result.error.message ?? result.error}\n`;
    if (output.includes("AS111") && output.includes("capsuleAbort")) {
      output += `\nhint: import the SDK in ${entry} (import { Tool } from "${SDK_PACKAGE}"), or at least \`import "${SDK_PACKAGE}/abort";\`\n`;
    }
    return { ok: false, output };
  }
  if (binary === null) return { ok: false, output: output + `the compiler wrote no ${outFile}\n` };
  writeAtomically(resolve(baseDir, outFile), binary);
  return { ok: true, output };
}

function parse(args) {
  const options = { profile: "release", out: null, entry: null };
  for (let i = 0; i < args.length; i++) {
    const arg = args[i];
    if (arg === "--dev" || arg === "--release") options.profile = arg.slice(2);
    else if (arg === "--out" && i + 1 < args.length) options.out = args[++i];
    else if (arg.startsWith("-") || options.entry !== null) throw new Error(`unexpected argument ${JSON.stringify(arg)}`);
    else options.entry = arg;
  }
  return options;
}

async function main() {
  let options;
  try {
    options = parse(process.argv.slice(2));
  } catch (error) {
    process.stderr.write(`${error.message}\n${USAGE}\n`);
    return 2;
  }
  const entry = options.entry ?? join("assembly", "index.ts");
  const outFile = options.out ?? componentFile(process.cwd());
  if (outFile === null) {
    process.stderr.write(`no --out FILE, and no [[component]] file in ${join(process.cwd(), "Capsule.toml")}\n${USAGE}\n`);
    return 2;
  }
  const { ok, output } = await build({ entry, outFile, profile: options.profile });
  const seconds = (performance.now() / 1000).toFixed(2); // since this process started
  if (ok) {
    process.stdout.write(`${output}built ${outFile} (${options.profile}, ${seconds} s)\n`);
    return 0;
  }
  process.stderr.write(`${output}build failed: ${entry} -> ${outFile} (${options.profile}, ${seconds} s)\n`);
  return 1;
}

function invokedDirectly() {
  try {
    return import.meta.url === pathToFileURL(realpathSync(process.argv[1])).href;
  } catch {
    return false;
  }
}

if (invokedDirectly()) {
  process.exitCode = await main().catch((error) => {
    process.stderr.write(`build failed: ${error?.message ?? error}\n`); // one line, no stack trace
    return 1;
  });
}

// Builds every example plugin: capsules/<name>/assembly/index.ts -> capsules/<name>/<name>.wasm
// Usage: node build.mjs [--out DIR] [name ...]   (--out writes elsewhere, used by the freshness test)
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync, readdirSync } from "node:fs";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const root = dirname(fileURLToPath(import.meta.url));
const args = process.argv.slice(2);
let outDir = null;
const names = [];
for (let i = 0; i < args.length; i++) {
  if (args[i] === "--out") outDir = args[++i];
  else names.push(args[i]);
}
const all = readdirSync(root, { withFileTypes: true })
  .filter((d) => d.isDirectory() && existsSync(join(root, d.name, "assembly", "index.ts")))
  .map((d) => d.name)
  .sort();
const asc = join(root, "node_modules", "assemblyscript", "bin", "asc.js");
for (const name of names.length ? names : all) {
  const target = outDir ? join(outDir, `${name}.wasm`) : join(root, name, `${name}.wasm`);
  mkdirSync(dirname(target), { recursive: true });
  execFileSync(process.execPath, [
    asc, join(name, "assembly", "index.ts"),
    "--outFile", target,
    "--optimizeLevel", "3", "--shrinkLevel", "0", "--noAssert",
    "--runtime", "incremental",
    "--use", "abort=sdk/abort/capsuleAbort",
  ], { cwd: root, stdio: "inherit" });
  console.log(`built ${target}`);
}

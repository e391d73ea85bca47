// notes: text notes stored as files under cwd://notes, the only folder it may read or write.
// `write` {"name","text"} -> {"written","bytes"}; `read` {"name"} -> {"name","text"};
// `list` -> {"notes": [names]}; `peek` {"path"} reads any path, to show that a read outside
// cwd://notes is denied (the host traps the call; the capsule never sees the file).
import { Fs, Json, Tool, utf8 } from "orch-capsule-sdk"; // also routes `abort` to the SDK's handler

const DIR = "cwd://notes";

/** A note's name: one path component, not "." or "..", no slashes, NUL or control characters. */
function checkName(name: string): string {
  if (name.length == 0) throw new Error("a note name must not be empty");
  if (name.length > 255) throw new Error("a note name must be at most 255 characters");
  if (name == "." || name == ".." || name.includes("..")) {
    throw new Error("invalid note name " + Json.quote(name) + ": it must not contain \"..\"");
  }
  for (let i = 0; i < name.length; i++) {
    const c = name.charCodeAt(i);
    if (c == 0x2f || c == 0x5c) {
      throw new Error("invalid note name " + Json.quote(name) + ": it must not contain \"/\" or \"\\\"");
    }
    if (c < 0x20 || c == 0x7f) {
      throw new Error("invalid note name " + Json.quote(name) + ": it must not contain control characters");
    }
  }
  return name;
}

function pathOf(name: string): string {
  return DIR + "/" + checkName(name);
}

export function write(): i32 {
  const args = Tool.args();
  const name = args.getString("name");
  const data = utf8(args.getString("text"));
  Fs.write(pathOf(name), data);
  Tool.outputJson(Json.object().putString("written", name).putInt("bytes", data.length).toString());
  return 0;
}

export function read(): i32 {
  const name = Tool.args().getString("name");
  const path = pathOf(name);
  if (!Fs.exists(path)) throw new Error("no note named " + Json.quote(name));
  const text = Fs.readString(path);
  Tool.outputJson(Json.object().putString("name", name).putString("text", text).toString());
  return 0;
}

export function list(): i32 {
  const names = Fs.exists(DIR) ? Fs.readdir(DIR) : new Array<string>();
  names.sort();
  Tool.outputJson(Json.object().putStrings("notes", names).toString());
  return 0;
}

export function peek(): i32 {
  const path = Tool.args().getString("path");
  const text = Fs.readString(path);
  Tool.outputJson(Json.object().putString("path", path).putString("text", text).toString());
  return 0;
}

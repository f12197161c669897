// The log's verifier, in the browser: RFC 9162 §2.1 inclusion and consistency proofs and
// C2SP signed notes (Ed25519) over tlog checkpoints, with WebCrypto only. It trusts
// nothing the server says beyond the bytes it checks; docs/audit-log.md is its contract.

const encoder = new TextEncoder();
const EM_DASH = "\u2014";

export class VerifyError extends Error {}

export function fromBase64(text) {
  let binary;
  try {
    binary = atob(text);
  } catch {
    throw new VerifyError(`not base64: ${text.slice(0, 20)}`);
  }
  return Uint8Array.from(binary, (c) => c.charCodeAt(0));
}

export function toBase64(bytes) {
  return btoa(String.fromCharCode(...bytes));
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

export function equal(a, b) {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

export async function sha256(bytes) {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
}

// RFC 9162 §2.1.1: leaf SHA-256(0x00 ‖ entry), node SHA-256(0x01 ‖ left ‖ right).
export async function leafHash(entryBytes) {
  return sha256(concat(Uint8Array.of(0), entryBytes));
}

export async function nodeHash(left, right) {
  return sha256(concat(Uint8Array.of(1), left, right));
}

// Tree sizes and indices as BigInt: JavaScript's bit operators stop at 32 bits.
const ZERO = 0n;
const ONE = 1n;
const lsb = (n) => (n & ONE) === ONE;

// RFC 9162 §2.1.3.2: the root an inclusion proof leads to, or an error.
export async function rootFromInclusion(index, size, leaf, path) {
  let fn = BigInt(index);
  let sn = BigInt(size) - ONE;
  if (fn > sn) throw new VerifyError(`index ${index} is not below size ${size}`);
  let r = leaf;
  for (const p of path) {
    if (sn === ZERO) throw new VerifyError("inclusion proof is longer than the tree allows");
    if (lsb(fn) || fn === sn) {
      r = await nodeHash(p, r);
      if (!lsb(fn)) {
        while (!lsb(fn) && fn !== ZERO) {
          fn >>= ONE;
          sn >>= ONE;
        }
      }
    } else {
      r = await nodeHash(r, p);
    }
    fn >>= ONE;
    sn >>= ONE;
  }
  if (sn !== ZERO) throw new VerifyError("inclusion proof is shorter than the tree needs");
  return r;
}

// RFC 9162 §2.1.4.2: true when a tree of `second` leaves with root `secondRoot` extends
// the tree of `first` leaves with root `firstRoot`; an error saying why otherwise.
export async function verifyConsistency(first, second, firstRoot, secondRoot, path) {
  let fn = BigInt(first);
  let sn = BigInt(second);
  if (fn < ONE || fn > sn) throw new VerifyError(`old size ${first} is not within 1..${second}`);
  if (fn === sn) {
    if (path.length !== 0) throw new VerifyError("proof between equal sizes must be empty");
    if (!equal(firstRoot, secondRoot)) throw new VerifyError("same size, different roots");
    return true;
  }
  if (path.length === 0) throw new VerifyError("empty consistency proof");
  const c = (fn & (fn - ONE)) === ZERO ? [firstRoot, ...path] : [...path];
  fn -= ONE;
  sn -= ONE;
  while (lsb(fn)) {
    fn >>= ONE;
    sn >>= ONE;
  }
  let fr = c[0];
  let sr = c[0];
  for (const p of c.slice(1)) {
    if (sn === ZERO) throw new VerifyError("consistency proof is longer than the trees allow");
    if (lsb(fn) || fn === sn) {
      fr = await nodeHash(p, fr);
      sr = await nodeHash(p, sr);
      if (!lsb(fn)) {
        while (!lsb(fn) && fn !== ZERO) {
          fn >>= ONE;
          sn >>= ONE;
        }
      }
    } else {
      sr = await nodeHash(sr, p);
    }
    fn >>= ONE;
    sn >>= ONE;
  }
  if (sn !== ZERO) throw new VerifyError("consistency proof is shorter than the trees need");
  if (!equal(fr, firstRoot)) throw new VerifyError("the old checkpoint's root does not follow");
  if (!equal(sr, secondRoot)) throw new VerifyError("the new checkpoint's root does not follow");
  return true;
}

// A C2SP verifier key: <name>+<8 hex digits of the key id>+<base64(0x01 ‖ public key)>.
export async function parseVerifierKey(vkey) {
  // The name holds no "+"; the base64 key may.
  const match = vkey.trim().match(/^([^+\s]+)\+([0-9a-fA-F]{8})\+(\S+)$/);
  if (!match) throw new VerifyError("verifier key: expected name+id+key");
  const [, name, idHex, keyText] = match;
  const raw = fromBase64(keyText);
  if (raw.length !== 33 || raw[0] !== 1) throw new VerifyError("verifier key: not an Ed25519 key");
  const publicKey = raw.slice(1);
  const id = (await sha256(concat(encoder.encode(name), Uint8Array.of(0x0a, 0x01), publicKey))).slice(0, 4);
  if (toHex(id) !== idHex.toLowerCase()) throw new VerifyError("verifier key: id does not match the key");
  const key = await crypto.subtle.importKey("raw", publicKey, { name: "Ed25519" }, false, ["verify"]);
  return { name, id, key, vkey: vkey.trim() };
}

// C2SP signed-note: body, an empty line, signature lines "— <name> <base64(id ‖ sig)>".
// Lines of unknown keys are ignored; every known key's line must verify; at least one must.
export async function openNote(text, verifiers) {
  const split = text.indexOf("\n\n");
  if (split < 0) throw new VerifyError("note: no signature block");
  const body = text.slice(0, split + 1);
  const lines = text.slice(split + 2).split("\n");
  if (lines.at(-1) === "") lines.pop();
  let verified = null;
  for (const line of lines) {
    const match = line.match(/^\u2014 (\S+) (\S+)$/u);
    if (!match) throw new VerifyError(`note: malformed signature line: ${line.slice(0, 40)}`);
    const raw = fromBase64(match[2]);
    if (raw.length < 5) throw new VerifyError("note: signature too short");
    const known = verifiers.find((v) => v.name === match[1] && equal(v.id, raw.slice(0, 4)));
    if (!known) continue;
    const ok = raw.length === 68 &&
      (await crypto.subtle.verify({ name: "Ed25519" }, known.key, raw.slice(4), encoder.encode(body)));
    if (!ok) throw new VerifyError(`note: the signature of ${known.name} does not verify`);
    verified = verified ?? known;
  }
  if (!verified) throw new VerifyError("note: no signature by a known log key");
  return { body, signer: verified };
}

// A C2SP tlog-checkpoint in a signed note: origin, size, root (and optional extensions).
export async function openCheckpoint(text, verifiers) {
  if (!text.includes(`\n\n${EM_DASH} `)) throw new VerifyError("checkpoint: not a signed note");
  const { body, signer } = await openNote(text, verifiers);
  const [origin, sizeText, rootText] = body.split("\n");
  if (!/^(0|[1-9][0-9]*)$/.test(sizeText ?? "")) throw new VerifyError("checkpoint: bad size line");
  if (origin !== signer.name) throw new VerifyError(`checkpoint: origin ${origin} is not the key's name`);
  const root = fromBase64(rootText ?? "");
  if (root.length !== 32) throw new VerifyError("checkpoint: bad root line");
  return { origin, size: BigInt(sizeText), root, signer };
}

// An entry with its inclusion proof against a signed checkpoint: the checks a receipt
// gets (docs/audit-log.md, "To verify a receipt"). Returns the parsed record.
export async function verifyEntry(proof, verifiers, step = () => {}) {
  const checkpoint = await openCheckpoint(proof.checkpoint, verifiers);
  step(`checkpoint signed by ${checkpoint.signer.name} (key ${toHex(checkpoint.signer.id)}): size ${checkpoint.size}`);
  if (BigInt(proof.size) !== checkpoint.size) throw new VerifyError("proof size is not the checkpoint's size");
  const entryBytes = encoder.encode(proof.entry);
  const leaf = await leafHash(entryBytes);
  step(`leaf hash of the entry: ${toBase64(leaf)}`);
  const path = proof.hashes.map(fromBase64);
  const root = await rootFromInclusion(proof.index, checkpoint.size, leaf, path);
  if (!equal(root, checkpoint.root)) throw new VerifyError(`inclusion path leads to ${toBase64(root)}, not the checkpoint's root`);
  step(`inclusion path of ${path.length} hashes leads to the checkpoint's root`);
  let record;
  try {
    record = JSON.parse(proof.entry);
  } catch {
    throw new VerifyError("entry: not JSON");
  }
  if (record.seq !== proof.index + 1) throw new VerifyError(`entry: seq ${record.seq} is not index ${proof.index} + 1`);
  return { record, checkpoint };
}

export function toHex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// The console pages' behaviour: fetch what a page proves and verify it here, in the
// browser (verifier.js). Text goes into the page with textContent only, never as HTML.
import {
  VerifyError,
  fromBase64,
  openCheckpoint,
  parseVerifierKey,
  verifyConsistency,
  verifyEntry,
} from "./verifier.js";

const PINNED = "kzg-console.pinned-vkeys";

function pinned() {
  try {
    const list = JSON.parse(localStorage.getItem(PINNED) || "[]");
    return Array.isArray(list) ? list.filter((v) => typeof v === "string") : [];
  } catch {
    return [];
  }
}

// The keys checkpoints must be signed with: the ones pinned in this browser if any, else
// the ones the gateway publishes (fetched without cookies, as any client would).
async function verifiers() {
  let vkeys = pinned();
  let source = "pinned in this browser";
  if (vkeys.length === 0) {
    const answer = await fetch("/v1/log/keys", { credentials: "omit" });
    if (!answer.ok) throw new VerifyError(`log keys: HTTP ${answer.status}`);
    vkeys = (await answer.json()).keys.map((k) => k.vkey);
    source = "published at /v1/log/keys";
  }
  return { keys: await Promise.all(vkeys.map(parseVerifierKey)), source };
}

async function fetchConsole(url, as) {
  const answer = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
  if (answer.status === 401) {
    const next = encodeURIComponent(location.pathname + location.search);
    location.assign(`/console/login?notice=expired&next=${next}`);
    throw new VerifyError("session expired");
  }
  if (!answer.ok) {
    let message = `HTTP ${answer.status}`;
    try {
      message = (await answer.json()).error.message;
    } catch {
      // the status says enough
    }
    throw new VerifyError(message);
  }
  return as === "text" ? answer.text() : answer.json();
}

function show(element, ok, text) {
  element.textContent = text;
  element.classList.remove("ok", "bad");
  element.classList.add(ok ? "ok" : "bad");
}

function stepper(list) {
  list.replaceChildren();
  return (text) => {
    const item = document.createElement("li");
    item.textContent = text;
    list.append(item);
  };
}

function reason(error) {
  return error instanceof Error ? error.message : String(error);
}

function fillRecord(table, record, verified) {
  const body = table.tBodies[0];
  body.replaceChildren();
  table.classList.toggle("unverified", !verified);
  document.getElementById("record-hint").textContent = verified
    ? "Shown from the entry whose leaf hash the proof covers, not from anything else the server says."
    : "NOT verified: these fields are only what the server sent.";
  for (const [name, value] of Object.entries(record)) {
    const row = body.insertRow();
    const th = document.createElement("th");
    th.scope = "row";
    th.textContent = name;
    row.append(th);
    const cell = row.insertCell();
    const code = document.createElement("code");
    code.textContent = value !== null && typeof value === "object" ? JSON.stringify(value, null, 1) : String(value);
    cell.append(code);
  }
}

async function eventPage() {
  const section = document.getElementById("event");
  const status = document.getElementById("proof-status");
  const step = stepper(document.getElementById("proof-steps"));
  let proof;
  try {
    proof = await fetchConsole(section.dataset.proofUrl, "json");
  } catch (error) {
    show(status, false, `INVALID: ${reason(error)}`);
    return;
  }
  document.getElementById("entry").textContent = proof.entry;
  document.getElementById("proof").textContent =
    `index ${proof.index}, tree size ${proof.size}\n${proof.hashes.join("\n")}`;
  document.getElementById("checkpoint").textContent = proof.checkpoint;
  try {
    const { keys, source } = await verifiers();
    step(`log keys ${source}: ${keys.length}`);
    const { record } = await verifyEntry(proof, keys, step);
    fillRecord(document.getElementById("record"), record, true);
    show(status, true, `valid: entry ${record.seq} is in the log of size ${proof.size}`);
  } catch (error) {
    try {
      fillRecord(document.getElementById("record"), JSON.parse(proof.entry), false);
    } catch {
      // an entry that is not even JSON has no fields to show
    }
    show(status, false, `INVALID: ${reason(error)}`);
  }
}

async function latestCheckpoint(status, verified) {
  const text = await fetchConsole("/console/api/checkpoint", "text");
  document.getElementById("latest-checkpoint").textContent = text;
  const { keys, source } = verified ?? (await verifiers());
  try {
    const opened = await openCheckpoint(text, keys);
    show(status, true, `valid: signed by ${opened.signer.name}, key ${source}; tree size ${opened.size}`);
    return opened;
  } catch (error) {
    show(status, false, `INVALID: ${reason(error)}`);
    throw error;
  }
}

async function checkConsistency() {
  const status = document.getElementById("consistency-status");
  const step = stepper(document.getElementById("consistency-steps"));
  status.textContent = "checking…";
  try {
    const held = document.getElementById("held").value.replace(/\r\n/g, "\n");
    if (!held.trim()) throw new VerifyError("paste or upload a checkpoint first");
    const verified = await verifiers();
    const old = await openCheckpoint(held.endsWith("\n") ? held : `${held}\n`, verified.keys);
    step(`your checkpoint: size ${old.size}, signature valid (keys ${verified.source})`);
    const latest = await latestCheckpoint(document.getElementById("checkpoint-status"), verified);
    step(`the log's latest checkpoint: size ${latest.size}, signature valid`);
    if (old.origin !== latest.origin) throw new VerifyError(`origin ${old.origin} is not the log's ${latest.origin}`);
    if (old.size > latest.size) throw new VerifyError(`your checkpoint (size ${old.size}) is ahead of the log's latest (${latest.size})`);
    if (old.size === 0n) {
      show(status, true, "valid: every log extends the empty tree");
      return;
    }
    const proof = await fetchConsole(`/console/api/proof/consistency?old=${old.size}&size=${latest.size}`, "json");
    const hashes = proof.hashes.map(fromBase64);
    await verifyConsistency(old.size, latest.size, old.root, latest.root, hashes);
    step(`consistency proof of ${hashes.length} hashes verifies`);
    show(status, true, `valid: the log at size ${latest.size} extends your checkpoint at size ${old.size}`);
  } catch (error) {
    show(status, false, `INVALID: ${reason(error)}`);
  }
}

async function verifyPage() {
  document.getElementById("held-file").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (file) document.getElementById("held").value = await file.text();
  });
  document.getElementById("check-consistency").addEventListener("click", checkConsistency);
  const status = document.getElementById("checkpoint-status");
  try {
    await latestCheckpoint(status);
  } catch (error) {
    if (!status.classList.contains("bad")) show(status, false, `INVALID: ${reason(error)}`);
  }
}

function keysPage() {
  const status = document.getElementById("pinned-status");
  const refresh = () => {
    const list = pinned();
    status.textContent = list.length ? list.map((v) => v.split("+").slice(0, 2).join("+")).join(", ") : "none";
  };
  for (const button of document.querySelectorAll("button.pin")) {
    button.addEventListener("click", async () => {
      try {
        await parseVerifierKey(button.dataset.vkey);
      } catch (error) {
        status.textContent = `not pinned: ${reason(error)}`;
        return;
      }
      localStorage.setItem(PINNED, JSON.stringify([...new Set([...pinned(), button.dataset.vkey])]));
      refresh();
    });
  }
  document.getElementById("unpin").addEventListener("click", () => {
    localStorage.removeItem(PINNED);
    refresh();
  });
  refresh();
}

const pages = { event: eventPage, verify: verifyPage, keys: keysPage };
pages[document.body.dataset.page]?.();

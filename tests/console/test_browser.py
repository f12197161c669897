"""The console in a real headless Chromium against a real gateway over TLS: an auditor's
story from a visit without a session to a tampered log shown INVALID, then an admin's.
The tests run in file order on one gateway and one browser; each leaves a screenshot in
test-artifacts/console/.
"""

from __future__ import annotations

import base64
import csv
import json
import time
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from audit.note import NoteSigner
from audit.verify import verify_export_lines
from gateway.appkeys import CONFIG
from tests.audit import reference_tlog
from tests.audit.conftest import AuditStore
from tests.audit.helpers import tamper
from tests.console.conftest import LiveGateway, Person
from tests.gateway.helpers import foreign_vkey, vkeys_of

VECTORS = Path(__file__).resolve().parents[3] / "shared" / "tlog-vectors" / "vectors.json"
PENDING = ("checking…", "not checked", "")


@pytest.fixture(scope="module")
def auditor(live_gateway: LiveGateway) -> Person:
    return live_gateway.person("alice", ["auditor"])


def shot(driver: Any, artifacts: Path, name: str, focus: str | None = None) -> None:
    """Save the viewport, scrolled to the element ``data-testid=focus`` if given."""
    if focus is not None:
        element = driver.find_element(By.CSS_SELECTOR, f'[data-testid="{focus}"]')
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    driver.save_screenshot(str(artifacts / f"{name}.png"))


def settled(driver: Any, testid: str, timeout: float = 20) -> str:
    """The text of a status element once the page's script has decided it."""
    wait = WebDriverWait(driver, timeout)
    # Found anew each time: after a form post the old page may still be showing.
    element = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f'[data-testid="{testid}"]'))
    wait.until(lambda _: element.text.strip() not in PENDING)
    return element.text.strip()


def log_in(driver: Any, person: Person) -> None:
    """Fill the login form with the keyboard only: type, Tab to the next field, Enter."""
    driver.switch_to.active_element.send_keys(person.username, Keys.TAB)
    driver.switch_to.active_element.send_keys(person.password, Keys.TAB)
    driver.switch_to.active_element.send_keys(person.code(), Keys.ENTER)


def wait_for_download(driver: Any, pattern: str) -> Path:
    """The file the browser finished downloading (Chromium renames it when complete)."""
    deadline = time.monotonic() + 15
    while not (done := list(driver.downloads.glob(pattern))):
        assert time.monotonic() < deadline, f"nothing downloaded as {pattern}"
        time.sleep(0.1)
    (download,) = done
    return download


def logged_in(driver: Any) -> None:
    """Wait for the page after a login: it names who is logged in."""
    WebDriverWait(driver, 10).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="who"]')
    )


def deny_some(gateway: LiveGateway, count: int) -> None:
    """Requests a client key may not make: audited as denied, 403."""
    key = gateway.api_key("client")
    for _ in range(count):
        assert (
            gateway.http("GET", "/v1/audit/verify", headers={"X-API-Key": key}).status_code == 403
        )


def rows(driver: Any) -> list[dict[str, Any]]:
    found = []
    for row in driver.find_elements(By.CSS_SELECTOR, "tr[data-seq]"):
        cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
        keys = ("seq", "time", "actor", "role", "action", "outcome", "status")
        found.append(
            {"data_seq": int(row.get_attribute("data-seq")), **dict(zip(keys, cells, strict=True))}
        )
    return found


def test_a_visit_without_session_shows_the_login_form(
    browser: Any, live_gateway: LiveGateway, artifacts: Path
) -> None:
    browser.get(live_gateway.url + "/console/events")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Log in"
    # Accessible names: each field has its label.
    for label, field in (
        ("Username", "username"),
        ("Password", "password"),
        ("One-time code", "totp"),
    ):
        element = browser.find_element(By.XPATH, f'//label[text()="{label}"]')
        assert element.get_attribute("for") == field
        assert browser.find_element(By.ID, field).is_displayed()
    assert browser.switch_to.active_element.get_attribute("id") == "username"
    assert browser.find_elements(By.CSS_SELECTOR, "tr[data-seq]") == []
    shot(browser, artifacts, "01-no-session-login")


def test_login_with_password_and_totp_by_keyboard(
    browser: Any, live_gateway: LiveGateway, auditor: Person, artifacts: Path
) -> None:
    # A wrong one-time code is refused with the login rules' message, nothing opened.
    browser.get(live_gateway.url + "/console/login")
    browser.find_element(By.ID, "username").send_keys(auditor.username)
    browser.find_element(By.ID, "password").send_keys(auditor.password)
    browser.find_element(By.ID, "totp").send_keys("000000", Keys.ENTER)
    error = WebDriverWait(browser, 10).until(
        lambda d: d.find_element(By.CSS_SELECTOR, '[data-testid="login-error"]')
    )
    assert error.is_displayed()
    assert browser.get_cookies() == []
    # The right one, after a visit without a session: back to the page asked for.
    browser.get(live_gateway.url + "/console/events")
    log_in(browser, auditor)
    logged_in(browser)
    assert browser.current_url.endswith("/console/events")
    assert browser.find_element(By.CSS_SELECTOR, '[data-testid="who"]').text == "alice (auditor)"
    (cookie,) = browser.get_cookies()
    assert (cookie["httpOnly"], cookie["secure"], cookie["sameSite"], cookie["path"]) == (
        True,
        True,
        "Strict",
        "/console",
    )
    assert browser.execute_script("return document.cookie") == ""
    nav = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "nav[aria-label=Main] a")]
    assert nav == ["Events", "Verification", "Checkpoints", "Access review", "Log keys", "Export"]
    shot(browser, artifacts, "02-logged-in-events")


def test_filtering_and_cursor_pages(
    browser: Any, live_gateway: LiveGateway, artifacts: Path
) -> None:
    deny_some(live_gateway, 55)
    browser.get(live_gateway.url + "/console/events")
    Select(browser.find_element(By.ID, "outcome")).select_by_visible_text("denied")
    browser.find_element(By.ID, "status").send_keys("403")
    browser.find_element(By.ID, "action").send_keys("audit_verify", Keys.ENTER)
    WebDriverWait(browser, 10).until(lambda d: "outcome=denied" in d.current_url)
    first = rows(browser)
    assert len(first) == 50
    for row in first:
        assert row["data_seq"] == int(row["seq"])
        assert (row["action"], row["outcome"], row["status"], row["role"]) == (
            "audit_verify",
            "denied",
            "403",
            "client",
        )
        assert row["actor"] == live_gateway.api_keys["client"]["id"]
    shot(browser, artifacts, "03-filtered-events")
    browser.find_element(By.CSS_SELECTOR, '[data-testid="next-page"]').click()
    WebDriverWait(browser, 10).until(lambda d: "after_seq=" in d.current_url)
    second = rows(browser)
    assert len(second) == 5
    assert min(r["data_seq"] for r in second) > max(r["data_seq"] for r in first)
    assert {r["outcome"] for r in second} == {"denied"}
    # The filter the form kept applies to the page after the cursor too.
    assert Select(browser.find_element(By.ID, "outcome")).first_selected_option.text == "denied"
    # An actor filter: only this auditor's console visits.
    browser.get(live_gateway.url + "/console/events?action=console_events&outcome=success")
    mine = rows(browser)
    assert mine and {r["role"] for r in mine} == {"auditor"}
    assert {r["action"] for r in mine} == {"console_events"}


def test_an_event_proof_verifies_in_the_browser(
    browser: Any, live_gateway: LiveGateway, artifacts: Path
) -> None:
    browser.get(live_gateway.url + "/console/events?outcome=denied")
    target = rows(browser)[0]["data_seq"]
    link = browser.find_element(By.CSS_SELECTOR, f'tr[data-seq="{target}"] a')
    link.send_keys(Keys.ENTER)
    status = settled(browser, "proof-status")
    assert status.startswith("valid"), status
    record = {
        row.find_element(By.TAG_NAME, "th").text: row.find_element(By.TAG_NAME, "td").text
        for row in browser.find_elements(By.CSS_SELECTOR, "#record tr")
    }
    assert (record["seq"], record["outcome"], record["http_status"]) == (
        str(target),
        "denied",
        "403",
    )
    entry = json.loads(browser.find_element(By.ID, "entry").text)
    assert entry["seq"] == target
    shot(browser, artifacts, "04-event-proof-valid")


def test_the_verifier_agrees_with_rfc9162_and_c2sp_vectors(
    browser: Any, live_gateway: LiveGateway
) -> None:
    """verifier.js, run in this Chromium, against the vectors the Go tlog and note
    packages produced and accepted: every proof accepted, every altered one refused."""
    vectors = json.loads(VECTORS.read_text())
    # Roots of every size a proof names, from the independent reference implementation.
    entries = [e.encode() for e in vectors["entries"]]
    sizes = {p["size"] for p in vectors["inclusion"] + vectors["consistency"]}
    sizes |= {p["old"] for p in vectors["consistency"]}
    for size in sizes:
        root = base64.b64encode(reference_tlog.tree_hash(entries[:size])).decode()
        assert vectors["roots"].setdefault(str(size), root) == root
    browser.get(live_gateway.url + "/console/")
    result = browser.execute_async_script(
        """
        const [vectors, done] = arguments;
        (async () => {
          const v = await import("/console/static/verifier.js");
          const b = (h) => v.fromBase64(h);
          const enc = new TextEncoder();
          const out = {inclusion: 0, consistency: 0, refused: 0, errors: []};
          const roots = Object.fromEntries(Object.entries(vectors.roots).map(([k, r]) => [k, b(r)]));
          const flip = (hs, i) => hs.map((h, j) => j === i ? h.map((x, k) => k === 0 ? x ^ 1 : x) : h);
          for (const p of vectors.inclusion) {
            const leaf = await v.leafHash(enc.encode(vectors.entries[p.index]));
            const path = p.hashes.map(b);
            const root = await v.rootFromInclusion(p.index, p.size, leaf, path);
            if (!v.equal(root, roots[p.size])) out.errors.push(`inclusion ${p.index}/${p.size}`);
            else out.inclusion++;
            for (let i = 0; i < path.length; i++) {
              let r = null;
              try { r = await v.rootFromInclusion(p.index, p.size, leaf, flip(path, i)); } catch {}
              if (r && v.equal(r, roots[p.size])) out.errors.push(`altered inclusion ${p.index}/${p.size}`);
              else out.refused++;
            }
          }
          for (const p of vectors.consistency) {
            const path = p.hashes.map(b);
            try {
              await v.verifyConsistency(p.old, p.size, roots[p.old], roots[p.size], path);
              out.consistency++;
            } catch (e) { out.errors.push(`consistency ${p.old}/${p.size}: ${e.message}`); }
            for (let i = 0; i < path.length; i++) {
              try {
                await v.verifyConsistency(p.old, p.size, roots[p.old], roots[p.size], flip(path, i));
                out.errors.push(`altered consistency ${p.old}/${p.size}`);
              } catch { out.refused++; }
            }
          }
          const key = await v.parseVerifierKey(vectors.note.verifier_key);
          const cp = await v.openCheckpoint(vectors.note.signed_checkpoint, [key]);
          out.checkpoint = [cp.origin, Number(cp.size), v.equal(cp.root, roots[cp.size])];
          try {
            await v.openCheckpoint(vectors.note.signed_checkpoint.replace("\\n300\\n", "\\n299\\n"), [key]);
            out.errors.push("altered checkpoint accepted");
          } catch { out.refused++; }
          return out;
        })().then(done, (e) => done({errors: [String(e)]}));
        """,
        vectors,
    )
    assert result["errors"] == []
    assert result["inclusion"] == len(vectors["inclusion"])
    assert result["consistency"] == len(vectors["consistency"])
    assert result["checkpoint"] == [vectors["note"]["name"], 300, True]
    assert result["refused"] > 0


def test_consistency_with_a_saved_checkpoint(
    browser: Any, live_gateway: LiveGateway, artifacts: Path, tmp_path: Path
) -> None:
    browser.get(live_gateway.url + "/console/verify")
    assert settled(browser, "checkpoint-status").startswith("valid")
    saved = browser.find_element(By.CSS_SELECTOR, '[data-testid="latest-checkpoint"]').text
    old_size = int(saved.split("\n")[1])
    held = tmp_path / "checkpoint.txt"
    held.write_text(saved + "\n", encoding="utf-8")
    deny_some(live_gateway, 3)  # the log grows after the auditor saved its checkpoint
    browser.get(live_gateway.url + "/console/verify")
    browser.find_element(By.ID, "held-file").send_keys(str(held))
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "held").get_attribute("value"))
    browser.find_element(By.ID, "check-consistency").click()
    status = settled(browser, "consistency-status")
    assert status.startswith("valid: the log at size"), status
    new_size = int(status.split("size ")[1].split()[0])
    assert new_size > old_size and status.endswith(f"your checkpoint at size {old_size}")
    shot(browser, artifacts, "05-consistency-valid", "consistency-status")

    # A checkpoint whose root was altered: its signature no longer verifies.
    lines = saved.split("\n")
    lines[2] = "A" + lines[2][1:] if lines[2][0] != "A" else "B" + lines[2][1:]
    # Signed with another key under the log's name: not a key the log publishes.
    origin = lines[0]
    impostor = NoteSigner.generate(origin).sign(f"{origin}\n{old_size}\n{lines[2]}\n")
    for forged, why in (
        ("\n".join(lines), "does not verify"),
        (impostor, "no signature by a known"),
    ):
        box = browser.find_element(By.ID, "held")
        box.clear()
        box.send_keys(forged)
        browser.find_element(By.ID, "check-consistency").click()
        WebDriverWait(browser, 10).until(
            lambda d: d.find_element(By.ID, "consistency-status").text.startswith("INVALID")
        )
        assert why in browser.find_element(By.ID, "consistency-status").text
    shot(browser, artifacts, "06-consistency-forged-invalid", "consistency-status")


def test_full_verification_by_the_gateway(
    browser: Any, live_gateway: LiveGateway, artifacts: Path
) -> None:
    browser.get(live_gateway.url + "/console/verify")
    browser.find_element(By.XPATH, '//button[text()="Run full verification"]').click()
    assert settled(browser, "verify-status") == "valid"
    shot(browser, artifacts, "07-full-verification-valid", "verify-status")


def test_pinned_log_keys_replace_the_published_ones(
    browser: Any, live_gateway: LiveGateway, artifacts: Path
) -> None:
    browser.get(live_gateway.url + "/console/keys")
    (vkey,) = [
        b.get_attribute("data-vkey") for b in browser.find_elements(By.CSS_SELECTOR, "button.pin")
    ]
    browser.find_element(By.CSS_SELECTOR, "button.pin").click()
    assert browser.find_element(By.ID, "pinned-status").text == "+".join(vkey.split("+")[:2])
    shot(browser, artifacts, "08-log-key-pinned")
    browser.get(live_gateway.url + "/console/event?seq=3")
    assert settled(browser, "proof-status").startswith("valid")
    assert "log keys pinned in this browser: 1" in browser.find_element(By.ID, "proof-steps").text
    # Pinned to another key of the same name: the log's own signature is no longer enough.
    browser.execute_script(
        "localStorage.setItem('kzg-console.pinned-vkeys', JSON.stringify([arguments[0]]))",
        foreign_vkey(vkey.split("+")[0]),
    )
    browser.get(live_gateway.url + "/console/event?seq=3")
    status = settled(browser, "proof-status")
    assert status == "INVALID: note: no signature by a known log key", status
    browser.get(live_gateway.url + "/console/keys")
    browser.find_element(By.ID, "unpin").click()
    assert browser.find_element(By.ID, "pinned-status").text == "none"


def test_the_export_downloads_and_verifies_offline(browser: Any, live_gateway: LiveGateway) -> None:
    browser.get(live_gateway.url + "/console/export")
    browser.find_element(By.CSS_SELECTOR, '[data-testid="export-download"]').click()
    export = wait_for_download(browser, "audit-*.jsonl")
    lines = export.read_text(encoding="utf-8").splitlines(keepends=True)
    assert json.loads(lines[-1])["type"] == "checkpoint"
    listing = live_gateway.http("GET", "/v1/log/keys").json()
    report = verify_export_lines(lines, trusted_log_keys=vkeys_of(listing))
    assert report.valid and report.checked == len(lines) - sum(
        json.loads(line)["type"] != "event" for line in lines
    )


def test_pages_fit_a_narrow_screen(
    browser: Any, live_gateway: LiveGateway, artifacts: Path
) -> None:
    try:
        browser.set_window_size(390, 844)
        for page in ("events", "verify", "keys", "checkpoints"):
            browser.get(f"{live_gateway.url}/console/{page}")
            # Wide tables scroll inside their box; the page itself never scrolls sideways.
            assert browser.execute_script(
                "return document.documentElement.scrollWidth <= window.innerWidth"
            ), page
        shot(browser, artifacts, "09-narrow-checkpoints")
    finally:
        browser.set_window_size(1280, 800)


def test_logout_ends_the_session(browser: Any, live_gateway: LiveGateway, artifacts: Path) -> None:
    browser.get(live_gateway.url + "/console/keys")
    browser.find_element(By.XPATH, '//button[text()="Log out"]').click()
    WebDriverWait(browser, 10).until(lambda d: "notice=logged_out" in d.current_url)
    notice = browser.find_element(By.CSS_SELECTOR, '[data-testid="notice"]')
    assert notice.text == "You are logged out."
    assert browser.get_cookies() == []
    browser.get(live_gateway.url + "/console/verify")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Log in"
    shot(browser, artifacts, "10-logged-out")


def test_an_admin_reviews_access_and_downloads_csv(
    browser: Any, live_gateway: LiveGateway, artifacts: Path
) -> None:
    admin = live_gateway.person("root", ["admin"])
    browser.get(live_gateway.url + "/console/access-review")
    log_in(browser, admin)
    logged_in(browser)
    assert browser.current_url.endswith("/console/access-review")
    nav = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "nav[aria-label=Main] a")]
    assert nav == ["Access review", "Log keys"]  # admins hold no audit:read
    shot(browser, artifacts, "11-admin-access-review")
    browser.find_element(By.CSS_SELECTOR, '[data-testid="csv-download"]').click()
    download = wait_for_download(browser, "access-review-*.csv")
    with download.open(newline="", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    names = {row["name"]: row for row in table}
    assert {"admin", "alice", "root", "console-client"} <= set(names)
    assert names["alice"]["roles"] == "auditor" and names["alice"]["kind"] == "user"
    assert names["console-client"]["kind"] == "api_key"
    # The audit pages stay closed to an admin.
    browser.get(live_gateway.url + "/console/events")
    assert "lacks audit:read" in browser.find_element(By.CSS_SELECTOR, '[data-testid="error"]').text
    browser.find_element(By.XPATH, '//button[text()="Log out"]').click()
    WebDriverWait(browser, 10).until(lambda d: "notice=logged_out" in d.current_url)


def test_a_tampered_entry_is_shown_invalid(
    browser: Any, live_gateway: LiveGateway, artifacts: Path
) -> None:
    """Last: rewrites history as the database owner could, with the guards switched off."""
    browser.get(live_gateway.url + "/console/login")
    log_in(browser, live_gateway.person("bob", ["auditor"]))
    logged_in(browser)
    browser.get(live_gateway.url + "/console/events?outcome=denied")
    victim = rows(browser)[2]["data_seq"]
    config = live_gateway.app[CONFIG]
    store = AuditStore("sqlite", config.database_owner_url, config.database_url)
    live_gateway.run(
        tamper(
            store,
            (
                "UPDATE audit_events SET outcome = 'success', http_status = 200 WHERE seq = :seq",
                {"seq": victim},
            ),
        )
    )
    browser.get(f"{live_gateway.url}/console/event?seq={victim}")
    status = settled(browser, "proof-status")
    assert status.startswith("INVALID"), status
    assert "not the checkpoint's root" in status
    shown = browser.find_element(By.ID, "record")
    assert "unverified" in shown.get_attribute("class")
    assert browser.find_element(By.ID, "record-hint").text.startswith("NOT verified")
    shot(browser, artifacts, "12-tampered-event-invalid")
    browser.get(live_gateway.url + "/console/verify")
    browser.find_element(By.XPATH, '//button[text()="Run full verification"]').click()
    assert settled(browser, "verify-status") == (
        f"INVALID: first bad index {victim - 1} (seq {victim})"
    )
    shot(browser, artifacts, "13-tampered-full-verification-invalid", "verify-status")

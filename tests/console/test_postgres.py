"""The console's server side on PostgreSQL (the runtime role, not the owner): filters,
cursor pages, checkpoints and an event's proof, checked here with the reference
verifier that imports nothing from ``audit/``."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

from tests.audit import reference_tlog
from tests.conftest import PgDatabase
from tests.console.conftest import start_live_gateway, stop_live_gateway
from tests.gateway.helpers import vkeys_of


def test_the_console_serves_a_postgresql_log(pg_database: PgDatabase, tmp_path: Path) -> None:
    gateway, thread = start_live_gateway(tmp_path / "gw", database=pg_database)
    try:
        client = {"X-API-Key": gateway.api_key("client")}
        auditor = {"X-API-Key": gateway.api_key("auditor")}
        for _ in range(4):
            assert gateway.http("GET", "/v1/audit/export", headers=client).status_code == 403
        page = gateway.http(
            "GET", "/console/events?outcome=denied&status=403&limit=3", headers=auditor
        )
        seqs = [int(s) for s in re.findall(r'<tr data-seq="(\d+)">', page.text)]
        assert page.status_code == 200 and len(seqs) == 3
        after = re.search(r'href="(/console/events\?[^"]*after_seq=\d+)"', page.text)
        assert after is not None
        rest = gateway.http("GET", after.group(1).replace("&amp;", "&"), headers=auditor)
        assert [int(s) for s in re.findall(r'<tr data-seq="(\d+)">', rest.text)] == [seqs[-1] + 1]

        proof = gateway.http(
            "GET", f"/console/api/event-proof?seq={seqs[0]}", headers=auditor
        ).json()
        vkeys = vkeys_of(gateway.http("GET", "/v1/log/keys").json())
        _, size, root = reference_tlog.open_checkpoint(proof["checkpoint"], vkeys)
        leaf = reference_tlog.leaf_hash(proof["entry"].encode())
        path = [base64.b64decode(h) for h in proof["hashes"]]
        assert reference_tlog.verify_inclusion(leaf, seqs[0] - 1, size, path, root)
        entry = json.loads(proof["entry"])
        assert (entry["seq"], entry["outcome"], entry["http_status"]) == (seqs[0], "denied", 403)

        heads = gateway.http("GET", "/console/checkpoints", headers=auditor)
        sizes = [int(s) for s in re.findall(r'<tr data-size="(\d+)">', heads.text)]
        assert sizes == sorted(sizes, reverse=True) and sizes[0] >= size
    finally:
        stop_live_gateway(gateway, thread)

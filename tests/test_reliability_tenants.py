"""Tenant isolation as a property: hypothesis drives random sequences of uploads (shared bytes and
shared Idempotency-Keys between the two keys), job creates, polls, lists, cancels and deletes by two
API keys against the real app on Postgres. At every step: no response to one key contains an id of
the other's; every id of the other's answers 404 (and leaves the owner's row as it was); each key's
lists (at random steps and at the end of each sequence) are exactly its own live rows."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.fixtures_api import upload

CONTENTS = [f"Agreement {n}. The parties agree to terms of {n} pages.\n".encode() * 4 for n in range(4)]
IDEMPOTENCY_KEYS = ["k-one", "k-two"]  # the same strings under both keys: each key has its own namespace


@dataclass
class Row:
    owner: str
    content: int | None = None  # documents: which CONTENTS
    document: str | None = None  # jobs: their document
    alive: bool = True
    jobs: list[str] = field(default_factory=list)


@dataclass
class World:
    """Every id either key of one sequence was given (each sequence has two new keys)."""

    rows: dict[str, Row] = field(default_factory=dict)
    idempotency: dict[tuple[str, str], str] = field(default_factory=dict)  # (owner, key) -> document id

    def ids_of(self, owner: str) -> set[str]:
        return {i for i, row in self.rows.items() if row.owner == owner}

    def live(self, owner: str, kind: str) -> set[str]:
        return {i for i, row in self.rows.items()
                if row.owner == owner and row.alive and (row.document is None) == (kind == "documents")}


def _other(who: str) -> str:
    return "b" if who == "a" else "a"


def test_two_keys_never_see_each_others_rows(client: TestClient, make_key: Callable[[str], dict[str, str]]):
    # Rebound per sequence (Tenants.__init__): what hypothesis draws must not depend on earlier ones.
    headers: dict[str, dict[str, str]] = {}
    world = World()
    seen_ids: set[str] = set()

    def checked(who: str, response, asked: str | None = None):  # noqa: ANN001, ANN202
        """`asked`: the id the request named (a 404 may say it back: the caller sent it)."""
        assert response.status_code < 500, response.text
        for foreign in world.ids_of(_other(who)) - {asked}:
            assert foreign not in response.text, (who, foreign, response.text)
        return response

    def not_found(who: str, response, asked: str) -> None:  # noqa: ANN001
        checked(who, response, asked)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found", response.text

    def listed(who: str, path: str) -> set[str]:
        ids, cursor = set(), None
        while True:
            r = checked(who, client.get(path, headers=headers[who], params={"limit": 100, "cursor": cursor}))
            assert r.status_code == 200, r.text
            ids |= {item["id"] for item in r.json()["items"]}
            if (cursor := r.json()["next_cursor"]) is None:
                return ids

    class Tenants(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            nonlocal world
            world = World()
            headers.update(a=make_key("tenant-a"), b=make_key("tenant-b"))

        def teardown(self) -> None:
            for who in "ab":
                self.lists_are_exactly_ones_own(who)
            seen_ids.update(world.rows)

        @rule(who=st.sampled_from("ab"), content=st.integers(0, len(CONTENTS) - 1),
              key=st.sampled_from([None, *IDEMPOTENCY_KEYS]))
        def upload(self, who: str, content: int, key: str | None) -> None:
            extra = {"Idempotency-Key": key} if key else None
            r = checked(who, upload(client, headers[who], CONTENTS[content], name="c.txt", extra_headers=extra))
            keyed = world.rows.get(world.idempotency.get((who, key), ""))
            if keyed is not None and keyed.alive and keyed.content != content:
                assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_key_reused", r.text
                return
            same = [i for i in world.live(who, "documents") if world.rows[i].content == content]
            assert r.status_code == (200 if same else 201), r.text
            doc_id = r.json()["id"]
            if same:
                assert [doc_id] == same
            else:
                world.rows[doc_id] = Row(who, content=content)
                if key:
                    world.idempotency[(who, key)] = doc_id

        @precondition(lambda self: any(r.document is None for r in world.rows.values()))
        @rule(who=st.sampled_from("ab"), data=st.data(), task=st.sampled_from(["summarize", "classify"]))
        def create_job(self, who: str, data: st.DataObject, task: str) -> None:
            # In creation order (ids are random; positions are what hypothesis replays).
            doc_id = data.draw(st.sampled_from([i for i, r in world.rows.items() if r.document is None]))
            row = world.rows[doc_id]
            r = client.post(f"/v1/documents/{doc_id}/jobs", headers=headers[who], json={"task": task})
            if row.owner != who or not row.alive:
                not_found(who, r, doc_id)
                return
            checked(who, r)
            assert r.status_code == 202, r.text
            world.rows[r.json()["id"]] = Row(who, document=doc_id)
            row.jobs.append(r.json()["id"])

        @precondition(lambda self: world.rows)
        @rule(who=st.sampled_from("ab"), data=st.data(),
              action=st.sampled_from(["get", "delete", "cancel", "jobs_of"]))
        def touch(self, who: str, data: st.DataObject, action: str) -> None:
            target = data.draw(st.sampled_from(list(world.rows)))
            row = world.rows[target]
            kind = "documents" if row.document is None else "jobs"
            if action == "jobs_of":
                if kind == "jobs":
                    return
                r = client.get("/v1/jobs", headers=headers[who], params={"document_id": target})
            elif action == "delete" and kind == "documents":
                r = client.delete(f"/v1/documents/{target}", headers=headers[who])
            elif action in ("delete", "cancel") and kind == "jobs":
                r = client.delete(f"/v1/jobs/{target}", headers=headers[who])
            else:
                r = client.get(f"/v1/{kind}/{target}", headers=headers[who])
            if row.owner != who or not row.alive:
                not_found(who, r, target)
                if row.owner != who and row.alive:  # the owner still has it, unchanged
                    owner = client.get(f"/v1/{kind}/{target}", headers=headers[row.owner])
                    assert checked(row.owner, owner).status_code == 200
                return
            checked(who, r)
            if action == "delete" and kind == "documents":
                assert r.status_code == 204, r.text
                row.alive = False
                for job in row.jobs:
                    world.rows[job].alive = False
            elif action in ("delete", "cancel"):
                assert r.status_code in (200, 409), r.text  # 409: canceled before
            else:
                assert r.status_code == 200, r.text

        @rule(who=st.sampled_from("ab"))
        def lists_are_exactly_ones_own(self, who: str) -> None:
            assert listed(who, "/v1/documents") == world.live(who, "documents")
            assert listed(who, "/v1/jobs") == world.live(who, "jobs")

    # Bounded: 20 sequences of up to 10 steps (~10 s here); derandomized, so a failure reproduces.
    run_state_machine_as_test(Tenants, settings=settings(
        max_examples=20, stateful_step_count=10, deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]))
    assert len(seen_ids) > 20
    # Any id never issued is a 404 too (not a 403 or a 500 that would tell ids apart).
    never = str(uuid.uuid4())
    not_found("a", client.get(f"/v1/documents/{never}", headers=headers["a"]), never)

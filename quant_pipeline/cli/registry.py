"""Registry, sign-off and audit-trail verbs: they read the store and MLflow the pipeline writes."""

from __future__ import annotations

import json
from pathlib import Path

from quant_pipeline.core.paths import default_store_dir
from quant_pipeline.core.store import ArtifactStore

# MLflow and Dagster take seconds to import: each command imports what it uses, so `--help`, usage errors,
# the store-only `verify` and the read-only verbs (`show`, `verify-trail`, `show-policy`) answer without them.


def _store_and_tracker():
    from quant_pipeline.defs.resources import build_resources

    resources = build_resources()
    return resources["settings"].store, resources["mlflow"]


def _store() -> ArtifactStore:
    return ArtifactStore(default_store_dir())


def _store_and_reader():
    """The store and a read-only view of the registry (MLflow's own client only where it must read it)."""
    from quant_pipeline.core.paths import default_mlflow_uri
    from quant_pipeline.core.registry_view import RegistryView

    view = RegistryView.of(default_mlflow_uri())
    if view is None:
        return _store_and_tracker()
    return _store(), view


def add_registry_commands(sub) -> None:
    """Registry, sign-off and audit-trail commands (read the store and MLflow the pipeline writes)."""

    def show(a):
        from quant_pipeline.release import registry

        store, tracker = _store_and_reader()
        print(json.dumps(registry.show(store, tracker, a.artifact_id), indent=2, default=str))
        return 0

    def verify(a):
        from quant_pipeline.core.artifacts import artifact_problems

        problems = artifact_problems(_store(), a.artifact_id)
        print(f"{a.artifact_id}: " + ("files match the record" if not problems else "MISMATCH: " + "; ".join(problems)))
        return 0 if not problems else 1

    def approve(a):
        from quant_pipeline.release import signoff

        store, tracker = _store_and_tracker()
        entry = signoff.approve(store, tracker, a.artifact_id, a.by, a.note, a.second_approver, a.override)
        override = f" (override, with {entry['second_approver']})" if entry["override"] else ""
        print(f"{a.artifact_id}: approved by {entry['by']}{override}; alias `approved` -> v{entry['registry_version']}")
        return 0

    def reject(a):
        from quant_pipeline.release import signoff

        store, tracker = _store_and_tracker()
        signoff.reject(store, tracker, a.artifact_id, a.by, a.note)
        print(f"{a.artifact_id}: rejected by {a.by}")
        return 0

    def promote(a):
        from quant_pipeline.release import signoff

        store, tracker = _store_and_tracker()
        entry = signoff.promote(store, tracker, a.artifact_id, a.by, a.note)
        print(f"production -> v{entry['registry_version']} ({a.artifact_id})")
        return 0

    def canary(a):
        from quant_pipeline.release.canary import set_canary

        store, tracker = _store_and_tracker()
        entry = set_canary(store, tracker, a.artifact_id, a.by, a.note)
        print(f"canary -> v{entry['registry_version']} ({a.artifact_id}): the serving config sets its share")
        return 0

    def rollback(a):
        from quant_pipeline.release import signoff

        store, tracker = _store_and_tracker()
        entry = signoff.rollback(store, tracker, a.model, a.by, a.note, to_base=a.to_base)
        base = " [base model]" if entry["to_base"] else ""
        print(f"production: v{entry['from_version']} -> v{entry['registry_version']} ({entry['artifact_id']}){base}")
        return 0

    def check_trail(a):
        """Exit 0 intact, 1 broken, 2 unknown model; --expected-head is an extra anchor on top of MLflow's."""
        from quant_pipeline.release import shared_trail, signoff
        from quant_pipeline.release.trail import anchor_problems

        store, tracker = _store_and_reader()
        try:  # on a tracking server, this host's copy first takes what the shared one adds (verified)
            shared_trail.catch_up(tracker, a.model, signoff.trail_path(store, a.model))
        except shared_trail.SharedTrailError as e:
            print(f"{a.model}: trail BROKEN:\n  {e}")
            return 1
        entries, problems = signoff.verified_model_trail(store, tracker, a.model)
        if a.expected_head:  # checked on the bytes MLflow's anchor was checked on, not on a second read
            head = entries[-1].get("hash") if entries else None
            problems += [p for p in anchor_problems(head, a.expected_head) if p not in problems]
        print(f"{a.model}: trail " + ("intact" if not problems else "BROKEN:\n  " + "\n  ".join(problems)))
        return 0 if not problems else 1

    def audit_report(a):
        from quant_pipeline.release import report

        store, tracker = _store_and_tracker()
        md, page = report.write_report(store, tracker, a.model)
        print(f"wrote {md}\nwrote {page}")
        return 0

    def bom(a):
        from quant_pipeline.release import registry

        store = _store()
        print(f"wrote {registry.write_bom(store, a.artifact_id)} (validated against CycloneDX 1.6)")
        return 0

    def pin_policy(a):
        from quant_pipeline.release import governing

        store, tracker = _store_and_tracker()
        entry = governing.pin_policy(store, tracker, a.model, Path(a.file), a.by, a.reason)
        print(
            f"{a.model}: governed by policy {entry['policy_name']} ({entry['policy_hash'][:12]}) from now on, "
            f"pinned by {entry['by']}; re-run the audit to judge its artifacts under it"
        )
        return 0

    def show_policy(a):
        from quant_pipeline.release import governing, signoff

        store, tracker = _store_and_reader()
        trail = signoff.require_intact_trail(store, tracker, a.model, f"read the policy of {a.model}")
        entry = signoff.governing_policy(store, a.model, trail)
        if entry is None:
            print(f"{a.model}: no policy pinned yet (the first judged audit pins the one it runs under)")
            return 0
        copy = governing.pinned_policy_file(store, entry["policy_hash"])
        print(
            f"{a.model}: policy {entry['policy_name']} ({entry['policy_hash'][:12]}), pinned by {entry['by']} "
            f"at {entry['at']}: {entry['reason']}\n{copy}\n\n{copy.read_text()}"
        )
        return 0

    def delete_base(a):
        from quant_pipeline.release import registry

        store = _store()
        registry.delete_base(store, a.model)
        print(f"deleted base checkpoint {a.model}")
        return 0

    def pull(a):
        from quant_pipeline.cli.pull import pull_model

        store, tracker = _store_and_tracker()
        return pull_model(store, tracker, a.model, weights=not a.no_weights)

    for name, func, help_text, args in (
        ("show", show, "print an artifact's full record", ["artifact_id"]),
        ("verify", verify, "re-hash an artifact's files against its record", ["artifact_id"]),
        (
            "approve",
            approve,
            "sign off an artifact whose checks passed",
            ["artifact_id", "--by", "--note", "--second-approver", "--override"],
        ),
        ("reject", reject, "record a rejection with its reason", ["artifact_id", "--by", "--note"]),
        ("promote", promote, "move `production` to an approved artifact", ["artifact_id", "--by", "--note"]),
        (
            "canary",
            canary,
            "point `canary` at an approved artifact (live traffic share)",
            ["artifact_id", "--by", "--note"],
        ),
        (
            "rollback",
            rollback,
            "move `production` back (previous approved version, or --to-base)",
            ["model", "--by", "--note", "--to-base"],
        ),
        ("verify-trail", check_trail, "check the model's hash-chained audit trail", ["model", "--expected-head"]),
        ("audit-report", audit_report, "write the model's audit report (HTML + Markdown)", ["model"]),
        ("bom", bom, "write an artifact's CycloneDX 1.6 ML-BOM", ["artifact_id"]),
        (
            "pin-policy",
            pin_policy,
            "change the policy that governs a model (a trail event with your name and a reason)",
            ["model", "--file", "--by", "--reason"],
        ),
        ("show-policy", show_policy, "print the policy that governs a model, as pinned in its trail", ["model"]),
        (
            "pull",
            pull,
            "rebuild this host's store of a model from the tracking server (every file verified by the trail)",
            ["model", "--no-weights"],
        ),
        ("delete-base", delete_base, "delete a kept base checkpoint (refused while artifacts depend on it)", ["model"]),
    ):
        p = sub.add_parser(name, help=help_text)
        for arg in args:
            if arg in ("--override", "--to-base", "--no-weights"):
                p.add_argument(arg, action="store_true")
            elif arg.startswith("--"):
                p.add_argument(
                    arg, default="" if arg != "--expected-head" else None, required=arg in ("--by", "--file")
                )
            else:
                p.add_argument(arg)
        p.set_defaults(func=func)

"""schemathesis hooks for .ci/fuzz-api (loaded through SCHEMATHESIS_HOOKS).

schemathesis 4 feeds ids it read from responses (a resource pool) into path
parameters even without stateful testing: it lists GET /v1/api_keys and then calls
DELETE /v1/api_keys/{id} with those ids, so it revokes the very key it is fuzzing
with, and every later call answers 401. The keys named in
CAPY_FUZZ_PROTECTED_KEY_IDS (the bootstrap admin and organization keys) are swapped
for an id that matches nothing; keys the fuzzer created itself may still be revoked.

GET /v1/jobs/{id}?wait=N long-polls up to N (at most 60) seconds while the job does
not change, and the pool hands the fuzzer real job ids: a valid wait above 1 is sent
as 1 so a run stays within minutes. Invalid values (61, -1, "abc") are sent as
generated, so the API's validation of `wait` is still fuzzed.

POST /v1/api_keys refuses an `expires_at` in the past (400), which no schema can
state: a past date the document allows is moved to the year 2999 (dates that are
not date-times are sent as generated, so their refusal is still fuzzed).

An admin key must name the organization of a key it creates (400 otherwise), a rule
for one kind of caller that the document cannot state: with the admin key, a
generated POST /v1/api_keys without `organization_id` gets the bootstrap
organization's (CAPY_FUZZ_NEW_KEY_ORGANIZATION_ID).

The stateful phase follows links inferred from response fields, and a field that is
null (an organization-wide key's `project_id`) reaches a path parameter as the text
"None", which is not the UUID the document asks for: such a parameter is sent as an
id that matches nothing (the API answers 404), so the path is still exercised.
"""

import os
from datetime import datetime, timezone

import schemathesis

PROTECTED = {
    part.strip().lower()
    for part in os.environ.get("CAPY_FUZZ_PROTECTED_KEY_IDS", "").split(",")
    if part.strip()
}
NEW_KEY_ORGANIZATION_ID = os.environ.get("CAPY_FUZZ_NEW_KEY_ORGANIZATION_ID", "")
MAX_WAIT = 1
# A fixed id (so runs repeat) that no key has.
STAND_IN = "00000000-0000-4000-8000-000000000000"


def _in_the_past(value):
    try:
        at = datetime.fromisoformat(str(value).replace("z", "Z"))
    except ValueError:
        return False
    if at.tzinfo is None:
        return False
    return at <= datetime.now(timezone.utc)


@schemathesis.hook
def before_call(context, case, kwargs):
    path = case.operation.path
    params = case.path_parameters
    if params:
        for name, value in list(params.items()):
            if value is None or value == "None":
                params[name] = STAND_IN
    if path == "/v1/api_keys" and case.method.upper() == "POST":
        body = case.body
        if isinstance(body, dict) and _in_the_past(body.get("expires_at")):
            body["expires_at"] = "2999-01-01T00:00:00Z"
        if isinstance(body, dict) and NEW_KEY_ORGANIZATION_ID and body.get("organization_id") is None:
            body["organization_id"] = NEW_KEY_ORGANIZATION_ID
    elif path == "/v1/api_keys/{id}":
        params = case.path_parameters
        if params and str(params.get("id", "")).lower() in PROTECTED:
            params["id"] = STAND_IN
    elif path == "/v1/jobs/{id}":
        query = case.query
        if not query or "wait" not in query:
            return
        try:
            wait = int(str(query["wait"]), 10)
        except ValueError:
            return
        if MAX_WAIT < wait <= 60:
            query["wait"] = MAX_WAIT

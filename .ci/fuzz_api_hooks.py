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
"""

import os

import schemathesis

PROTECTED = {
    part.strip().lower()
    for part in os.environ.get("CAPY_FUZZ_PROTECTED_KEY_IDS", "").split(",")
    if part.strip()
}
MAX_WAIT = 1
# A fixed id (so runs repeat) that no key has.
STAND_IN = "00000000-0000-4000-8000-000000000000"


@schemathesis.hook
def before_call(context, case, kwargs):
    path = case.operation.path
    if path == "/v1/api_keys/{id}":
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

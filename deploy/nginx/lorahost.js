// nginx JavaScript (njs) for a fleet of lorahost replicas behind one nginx.
//
// Two jobs that plain nginx configuration cannot do:
//   route    generation requests name their adapter in the JSON body (`model`), not in the URL
//            or a header, so the body is parsed here and the adapter becomes the consistent-hash
//            key of the `lorahost_affinity` upstream: each adapter is served by one replica,
//            whose adapter cache stays warm for it.
//   adapter  every replica has its own adapter store, so an upload or a delete must reach all
//            of them: it is sent to every replica in parallel and succeeds only when every
//            replica acknowledged it (deploy/README.md, "Uploads and deletes").
//
// Written for njs 0.7 (Debian 12) and later: no ngx.fetch (subrequests reuse the client's
// already buffered body), no optional chaining.

// Statuses that a replica's lorahost never sends but nginx does when the replica could not be
// reached or did not answer in time (the subrequest's proxy_pass failed).
const UNREACHABLE = [0, 502, 504];

// `model` is an adapter name (or an admin's `tenant/name`) or the base model's id. The base needs
// no adapter cache, so its requests are spread over all replicas by hashing a per-request random
// key instead; so are requests without a usable `model`, which any replica rejects alike.
function route(r) {
    const model = requestModel(r);
    const base = r.variables.lorahost_base_model;
    if (model === null || (base && model === base)) {
        r.variables.lorahost_route_key = r.variables.request_id;
    } else {
        // An admin names another tenant's adapter as `tenant/name`; hashing the name alone sends
        // it to the replica that the tenant's own requests keep warm.
        r.variables.lorahost_route_key = model.slice(model.lastIndexOf('/') + 1);
    }
    r.internalRedirect('@generate');
}

function requestModel(r) {
    // A body over client_body_buffer_size is spooled to an already unlinked temp file that njs
    // cannot read. It is spread like a base request: still served, only without affinity (1 MiB
    // of prompt is far beyond the context of the models lorahost serves).
    if (r.variables.request_body_file) {
        return null;
    }
    let model;
    try {
        model = JSON.parse(r.requestText).model;
    } catch (e) {
        return null;
    }
    return typeof model === 'string' && model.length > 0 ? model : null;
}

// GET of one adapter goes to any replica (they all hold the same adapters); PUT and DELETE go to
// every replica.
function adapter(r) {
    if (r.method === 'PUT' || r.method === 'DELETE') {
        fanout(r);
    } else {
        r.internalRedirect('@any');
    }
}

function fanout(r) {
    const replicas = r.variables.lorahost_replicas.split(' ').filter(function (s) { return s !== ''; });
    // The location matched ^/v1/adapters/NAME$ with NAME in lorahost's own charset, so r.uri
    // needs no escaping and cannot reach any other route of a replica.
    const calls = replicas.map(function (replica) {
        // With no `body` option a subrequest sends the client's body from nginx's spool file,
        // so an upload of any size is never copied into JavaScript.
        return r.subrequest('/_lorahost_replica/' + replica + r.uri, { method: r.method })
            .then(function (reply) {
                return { replica: replica, status: reply.status, body: reply.responseText,
                         retryAfter: reply.headersOut['Retry-After'] };
            }, function (e) {
                return { replica: replica, status: 0, body: String(e) };
            });
    });
    Promise.all(calls)
        .then(function (replies) { answer(r, replies); })
        .catch(function (e) {
            r.error('lorahost: fan-out of ' + r.method + ' ' + r.uri + ' failed: ' + e);
            r.return(500, JSON.stringify({ error: {
                message: 'the router failed to combine the replicas\' answers',
                type: 'server_error', code: 'internal_error', param: null } }));
        });
}

function answer(r, replies) {
    const deleting = r.method === 'DELETE';
    // A delete that finds the adapter already gone has the effect asked for: retrying a delete
    // that reached only some replicas must succeed.
    const ok = function (x) { return (x.status >= 200 && x.status < 300) || (deleting && x.status === 404); };
    // Replicas validate against the same base with the same limits, so one replica's rejection
    // (400, 401, 413, 422, 429, ...) is the answer for the request as a whole.
    const rejected = replies.filter(function (x) { return x.status >= 400 && x.status < 500 && !ok(x); });
    const failed = replies.filter(function (x) { return !ok(x) && rejected.indexOf(x) < 0; });

    r.headersOut['X-Lorahost-Fanout'] =
        replies.map(function (x) { return x.replica + '=' + x.status; }).join(', ');
    r.headersOut['Content-Type'] = 'application/json';

    if (rejected.length > 0) {
        // A 429 keeps the replica's advice on when to come back.
        if (rejected[0].retryAfter) {
            r.headersOut['Retry-After'] = rejected[0].retryAfter;
        }
        r.return(rejected[0].status, rejected[0].body);
        return;
    }
    if (failed.length > 0) {
        const done = replies.length - failed.length;
        const what = deleting ? 'deleted' : 'stored';
        const message = 'the adapter was ' + what + ' on ' + done + ' of ' + replies.length
            + ' replicas; ' + failed.map(describe).join(', ')
            + '. Repeat the request once every replica is up: it is idempotent.';
        r.headersOut['Retry-After'] = '5';
        r.return(503, JSON.stringify({ error: {
            message: message, type: 'server_error', code: 'replica_unavailable', param: null } }));
        return;
    }
    // All acknowledged. An upload is 201 if it was new anywhere, 200 if every replica replaced an
    // older generation; a delete is 404 only if no replica had the adapter.
    const found = replies.filter(function (x) { return x.status < 300; });
    if (found.length === 0) {
        r.return(404, replies[0].body);
        return;
    }
    const created = found.filter(function (x) { return x.status === 201; });
    const chosen = created.length > 0 ? created[0] : found[0];
    r.return(chosen.status, chosen.body);
}

function describe(x) {
    if (UNREACHABLE.indexOf(x.status) >= 0) {
        return x.replica + ' unreachable';
    }
    return x.replica + ' answered ' + x.status;
}

export default { route, adapter };

// The REST API as the page uses it: the key header, error bodies, and watches that resume.
// Paths are the google.api.http routes of proto/orchestrator/v1 (docs/GATEWAY.md).

const KEY_STORAGE = "orchestrator.console.key";

// The key lives in sessionStorage (gone when the tab closes) and travels only as a header:
// never in a URL (URLs land in access logs, history and Referer) and never in the console log.
export function currentKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

function headers(extra) {
  const result = { Accept: "application/json", ...extra };
  const key = currentKey();
  if (key) result["x-api-key"] = key;
  return result;
}

// An error answer of the gateway: {"error": {code, status, message, details}}.
export class ApiError extends Error {
  constructor(httpStatus, status, message) {
    super(message);
    this.httpStatus = httpStatus;
    this.status = status;
  }
}

async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON (a proxy's page): the HTTP status is all there is
  }
  const error = body && body.error;
  if (error) return new ApiError(response.status, error.status || "", error.message || response.statusText);
  return new ApiError(response.status, "", `HTTP ${response.status} ${response.statusText}`);
}

export async function get(path, params) {
  const query = params ? `?${new URLSearchParams(params)}` : "";
  const response = await fetch(path + query, { headers: headers(), cache: "no-store" });
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

export async function post(path, body) {
  const response = await fetch(path, {
    method: "POST",
    headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify(body || {}),
  });
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

// Splits a streamed body into JSON lines (the gateway streams application/x-ndjson).
async function* ndjson(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffered += decoder.decode(value, { stream: true });
    let newline;
    while ((newline = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, newline).trim();
      buffered = buffered.slice(newline + 1);
      if (line) yield JSON.parse(line);
    }
  }
}

// Follows a watch route for as long as the page lives. Each message goes to onMessage; when the
// connection drops (server restart, proxy timeout, network) it reconnects with start_revision set
// to the last revision seen, so nothing between is missed; the server answers a revision it no
// longer holds with a resync notice (handled by the caller) followed by a fresh initial state.
// onState("live", null, resumedFrom) / onState("reconnecting", error) reports the connection for
// the header badge.
export function watch(path, params, { onMessage, onState }) {
  let revision = 0;
  let stopped = false;
  let controller = null;
  let attempts = 0;
  let wake = null; // ends the wait between retries early (a new key should not wait 5 s)
  let restarting = false; // the current connection was ended on purpose, not lost

  function pause(ms) {
    return new Promise((resolve) => {
      wake = resolve;
      setTimeout(resolve, ms);
    });
  }

  async function run() {
    while (!stopped) {
      controller = new AbortController();
      const query = new URLSearchParams(params);
      const resumeFrom = revision;
      if (resumeFrom > 0) query.set("start_revision", String(resumeFrom));
      try {
        const response = await fetch(`${path}?${query}`, {
          headers: headers(),
          cache: "no-store",
          signal: controller.signal,
        });
        if (!response.ok) throw await errorOf(response);
        attempts = 0;
        onState("live", null, resumeFrom);
        for await (const message of ndjson(response.body)) {
          // A failure after the stream started arrives as a last line {"error": ...}.
          if (message.error) throw new ApiError(message.error.code, message.error.status, message.error.message);
          onMessage(message);
          // A resync notice carries no state to resume from: until the initial state that
          // follows it arrives, a reconnect must ask again with the old revision.
          const seen = Number(message.revision || 0);
          if (seen > 0 && !message.resync) revision = seen;
        }
        throw new Error("the watch ended");
      } catch (error) {
        controller = null;
        if (stopped) return;
        if (restarting) {
          restarting = false;
          continue;
        }
        attempts += 1;
        onState("reconnecting", error);
        // Quick first retries (a restart takes a second or two), then at most every 5 s.
        await pause(Math.min(5000, 100 * 2 ** Math.min(attempts, 6)));
      }
    }
  }

  run();
  return {
    // From scratch (a new key): the caller drops its state; an initial state follows.
    restart() {
      revision = 0;
      attempts = 0;
      restarting = controller !== null;
      if (controller) controller.abort();
      if (wake) wake();
    },
    stop() {
      stopped = true;
      if (controller) controller.abort();
      if (wake) wake();
    },
  };
}

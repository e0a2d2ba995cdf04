// The console's entry point: the key, the caller's role, the views and what keeps them fresh.

import * as api from "./api.js";
import { Fleet } from "./fleet.js";
import { refreshHealth } from "./health.js";
import { Tasks } from "./tasks.js";

const $ = (id) => document.getElementById(id);
const POLL_MS = 2000;
const AGENT_HEALTH_POLL_MS = 3000;

// -- the caller's role -----------------------------------------------------------------------------
// The API has no "who am I" call, so the page asks a harmless question only an admin may ask:
// cancel a task id the server never issues. The auth interceptor answers before the task is
// looked up: PERMISSION_DENIED (403) for a reader or agent key, UNAUTHENTICATED (401) for no or a
// wrong key, and NOT_FOUND (404) once the caller passed, i.e. may act. Nothing changes on the
// server (the audit log records one refused CancelTask of "console-role-probe"). Until the answer
// is 404, the page draws no action at all; the server refuses them anyway.
const PROBE_PATH = "/tasks/console-role-probe/cancel";
let canAct = false;
// Each probe's number: a probe still in flight when the key changes (the page's first probe, with
// the key it loaded with) must not decide the role of the new key when its answer comes last.
let latestProbe = 0;

async function probeRole() {
  const probe = ++latestProbe;
  let role;
  try {
    await api.post(PROBE_PATH, { reason: "console role probe" });
    role = { canAct: false, text: "unexpected answer: read only" };
  } catch (error) {
    if (error.httpStatus === 404) role = { canAct: true, text: "may act" };
    else if (error.httpStatus === 403) role = { canAct: false, text: "read only" };
    else if (error.httpStatus === 401) {
      role = { canAct: false, text: api.currentKey() ? "key refused" : "no key" };
      role.notice = `Enter an API key (a reader key is enough to look): ${error.message}`;
    }
    else role = { canAct: false, text: `read only (${error.message})` };
  }
  if (probe !== latestProbe) return;
  if (role.notice) notify(role.notice);
  canAct = role.canAct;
  $("role").textContent = role.text;
  document.body.dataset.role = canAct ? "actor" : "reader";
  $("create-task").hidden = !canAct;
  fleet.schedule();
  refreshTasks();
}

// -- notices -----------------------------------------------------------------------------------

function notify(text, kind = "error") {
  const notice = $("notice");
  notice.textContent = text;
  notice.className = `notice ${kind}`;
  notice.hidden = false;
}

// Runs an action; a refusal shows the server's own message (status and text from the error body).
async function act(what, call) {
  try {
    const answer = await call();
    notify(`${what}: done`, "ok");
    return answer;
  } catch (error) {
    notify(`${what} refused: ${error.status ? `${error.status}: ` : ""}${error.message}`);
    return null;
  } finally {
    refreshTasks();
  }
}

const actions = {
  allowed: () => canAct,
  notify,
  drain: (agent) =>
    act(`Drain ${agent.name}`, () =>
      api.post(`/agents/${encodeURIComponent(agent.agent_id)}/drain`, { reason: "drained from the console" }),
    ),
  undrain: (agent) => act(`Undrain ${agent.name}`, () => api.post(`/agents/${encodeURIComponent(agent.agent_id)}/undrain`, {})),
  cancel: (task) =>
    act(`Cancel ${task.task_id}`, () =>
      api.post(`/tasks/${encodeURIComponent(task.task_id)}/cancel`, { reason: "cancelled from the console" }),
    ),
};

// -- views -------------------------------------------------------------------------------------

const fleet = new Fleet({
  groups: $("fleet-groups"),
  counts: $("status-counts"),
  spark: $("fleet-sparkline"),
  actions,
});
const tasks = new Tasks(
  {
    queue: $("queue-depth"),
    running: $("running-tasks"),
    runningCount: $("running-count"),
    pending: $("pending-tasks"),
    failed: $("failed-tasks"),
    recent: $("recent-tasks"),
    detail: $("task-detail"),
  },
  actions,
);

function showView() {
  const view = (location.hash || "#fleet").slice(1);
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== `view-${view}`;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("current", link.dataset.view === view);
  document.body.dataset.view = view;
}

// -- live data ---------------------------------------------------------------------------------

const streamState = $("stream-state");
let reconnects = 0;

function onStreamState(state, error, resumedFrom) {
  if (state === "reconnecting") {
    reconnects += 1;
    streamState.dataset.reconnects = String(reconnects);
  } else {
    // 0: a fresh snapshot; otherwise the revision the watch resumed after.
    streamState.dataset.resumedFrom = String(resumedFrom);
  }
  streamState.dataset.state = state;
  streamState.textContent = state === "live" ? "live" : `reconnecting${error ? `: ${error.message}` : ""}`;
  streamState.className = `stream-state ${state}`;
}

const agentsWatch = api.watch("/discovery/watch", {}, {
  onMessage: (message) => fleet.onAgentsMessage(message),
  onState: onStreamState,
});
const healthWatch = api.watch("/health/watch", {}, {
  onMessage: (message) => fleet.onHealthMessage(message),
  onState: () => {},
});

async function refreshTasks() {
  try {
    await tasks.refresh();
  } catch (error) {
    if (document.body.dataset.view === "tasks") notify(`Tasks: ${error.message}`);
  }
}

async function refreshSystem() {
  try {
    await refreshHealth($("system-health"), $("failover-banner"));
  } catch (error) {
    if (document.body.dataset.view === "health") notify(`Health: ${error.message}`);
  }
}

async function refreshAgentHealth() {
  try {
    const answer = await api.get("/health/agents", { page_size: "1000" });
    fleet.mergeHealth(answer.agents || []);
  } catch {
    // the watch's badge already says when the server cannot be reached
  }
}

// Every poll waits for its previous answer, so a slow server never piles requests up.
function every(ms, work) {
  const loop = async () => {
    await work();
    setTimeout(loop, ms);
  };
  loop();
}

// -- the key -----------------------------------------------------------------------------------

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = $("key-input");
  api.setKey(input.value.trim());
  input.value = "";
  restart();
});
$("key-forget").addEventListener("click", () => {
  api.setKey("");
  restart();
});

function restart() {
  // Until the new key's probe answers, the page offers nothing the key may not do.
  canAct = false;
  $("role").textContent = "checking…";
  $("create-task").hidden = true;
  $("notice").hidden = true;
  fleet.forget();
  agentsWatch.restart();
  healthWatch.restart();
  probeRole();
  refreshSystem();
  refreshAgentHealth();
}

// -- create a task -----------------------------------------------------------------------------

$("create-task").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const output = $("create-result");
  const spec = { type: form.type.value.trim() };
  try {
    const payload = JSON.parse(form.payload.value || "{}");
    if (payload === null || typeof payload !== "object" || Array.isArray(payload)) throw new Error("not an object");
    spec.payload = payload;
  } catch (error) {
    output.textContent = `payload must be a JSON object (${error.message})`;
    return;
  }
  const priority = Number(form.priority.value || 0);
  if (priority) spec.priority = priority;
  const maxAttempts = Number(form.max_attempts.value || 0);
  if (maxAttempts) spec.max_attempts = maxAttempts;
  for (const name of ["target_agent_id", "label_selector"]) {
    if (form[name].value.trim()) spec[name] = form[name].value.trim();
  }
  const capabilities = form.required_capabilities.value.split(",").map((item) => item.trim()).filter(Boolean);
  if (capabilities.length) spec.required_capabilities = capabilities;
  const answer = await act(`Create ${spec.type || "task"}`, () => api.post("/tasks/create", { spec }));
  output.textContent = answer ? `created ${answer.task.task_id}` : "";
  output.dataset.taskId = answer ? answer.task.task_id : "";
  if (answer) tasks.show(answer.task.task_id);
});

// -- start -------------------------------------------------------------------------------------

window.addEventListener("hashchange", showView);
showView();
probeRole();
every(POLL_MS, refreshTasks);
every(POLL_MS, refreshSystem);
every(AGENT_HEALTH_POLL_MS, refreshAgentHealth);
// "last beat" ages every second even when nothing is streamed.
setInterval(() => fleet.schedule(), 1000);

// Tasks view: queue depth by priority, running tasks, waiting tasks with the reason no agent takes
// them (Task.pending_reason), recent failures, and one task's attempts as a timeline. The lists
// are polled from GET /tasks/list (there is no fleet-wide task watch); the open task follows its
// own watch (GET /tasks/{task_id}/watch) until it ends.

import { ago, enumName, h, millis, replaceChildren, svg } from "./dom.js";
import * as api from "./api.js";

const TERMINAL = new Set(["SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT"]);
const LIST_LIMIT = 500;
const statusOf = (task) => enumName(task.status, "TASK_STATUS_");

async function list(status, pageSize) {
  const params = { page_size: String(pageSize) };
  if (status) params.status = `TASK_STATUS_${status}`;
  const answer = await api.get("/tasks/list", params);
  return { tasks: answer.tasks || [], more: Boolean(answer.next_page_token) };
}

export class Tasks {
  constructor(elements, actions) {
    this.elements = elements; // {queue, running, runningCount, pending, failed, recent, detail}
    this.actions = actions; // {allowed(), cancel(task), notify(text)}
    this.open = null; // {taskId, watch, task}
  }

  async refresh() {
    const [pending, assigned, running, failed, timedOut, recent] = await Promise.all([
      list("PENDING", LIST_LIMIT),
      list("ASSIGNED", LIST_LIMIT),
      list("RUNNING", LIST_LIMIT),
      list("FAILED", 20),
      list("TIMED_OUT", 20),
      list("", 25),
    ]);
    const now = Date.now();
    this.renderQueue(pending);
    const active = [...assigned.tasks, ...running.tasks];
    this.elements.runningCount.textContent = String(active.length) + (assigned.more || running.more ? "+" : "");
    this.renderTable(this.elements.running, ["task", "type", "status", "agent", "attempt", "progress", "since"], active, (task) => {
      const attempt = currentAttempt(task);
      const progress = task.progress && task.progress.fraction ? `${Math.round(task.progress.fraction * 100)} %` : "";
      return [attempt ? attempt.agent_id : "", attempt ? `#${attempt.number}` : "", progress, ago(attempt && attempt.assigned_at, now)];
    });
    this.renderTable(this.elements.pending, ["task", "type", "status", "priority", "waiting", "why no agent takes it"], pending.tasks, (task) => [
      task.spec.priority || 0,
      ago(task.created_at, now),
      pendingReason(task),
    ]);
    const failures = [...failed.tasks, ...timedOut.tasks]
      .sort((a, b) => millis(b.finished_at) - millis(a.finished_at))
      .slice(0, 20);
    this.renderTable(this.elements.failed, ["task", "type", "status", "reason", "message", "finished"], failures, (task) => [
      h("code", {}, (task.error && task.error.reason) || ""),
      (task.error && task.error.message) || "",
      ago(task.finished_at, now),
    ]);
    this.renderTable(this.elements.recent, ["task", "type", "status", "attempts", "created"], recent.tasks, (task) => [
      task.attempt_count || 0,
      ago(task.created_at, now),
    ]);
  }

  renderQueue(pending) {
    const byPriority = new Map();
    for (const task of pending.tasks) {
      const priority = task.spec.priority || 0;
      byPriority.set(priority, (byPriority.get(priority) || 0) + 1);
    }
    const rows = [...byPriority.entries()].sort((a, b) => b[0] - a[0]);
    replaceChildren(
      this.elements.queue,
      h("thead", {}, h("tr", {}, h("th", {}, "priority"), h("th", {}, "waiting"))),
      h(
        "tbody",
        {},
        rows.length
          ? rows.map(([priority, count]) => h("tr", { dataset: { priority } }, h("td", {}, priority), h("td", { class: "number" }, count)))
          : h("tr", {}, h("td", { colspan: 2, class: "empty" }, "queue empty")),
        pending.more ? h("tr", {}, h("td", { colspan: 2, class: "muted" }, `first ${LIST_LIMIT} shown`)) : null,
      ),
    );
  }

  // One table of tasks: id (opens the timeline), type, status, then `cells(task)`, then Cancel.
  renderTable(table, titles, tasks, cells) {
    const canAct = this.actions.allowed();
    replaceChildren(
      table,
      h("thead", {}, h("tr", {}, titles.map((title) => h("th", {}, title)), canAct ? h("th", {}, "") : null)),
      h(
        "tbody",
        {},
        tasks.length
          ? tasks.map((task) => {
              const status = statusOf(task);
              return h(
                "tr",
                { dataset: { taskId: task.task_id, status } },
                h("td", {}, h("a", { href: "#tasks", class: "task-link", onclick: () => this.show(task.task_id) }, task.task_id)),
                h("td", {}, task.spec.type),
                h("td", {}, h("span", { class: `pill status-${status}` }, status)),
                cells(task).map((cell) => h("td", {}, cell)),
                canAct ? h("td", {}, this.cancelButton(task, status)) : null,
              );
            })
          : h("tr", {}, h("td", { colspan: titles.length + 1, class: "empty" }, "none")),
      ),
    );
  }

  cancelButton(task, status) {
    if (TERMINAL.has(status)) return null;
    return h("button", { class: "action cancel", onclick: () => this.actions.cancel(task) }, "Cancel");
  }

  // -- one task ----------------------------------------------------------------------------------

  show(taskId) {
    if (this.open) this.open.watch.stop();
    this.open = { taskId, task: null, watch: null };
    this.elements.detail.hidden = false;
    replaceChildren(this.elements.detail, h("p", { class: "muted" }, `loading ${taskId}…`));
    const open = this.open;
    open.watch = api.watch(`/tasks/${encodeURIComponent(taskId)}/watch`, {}, {
      onMessage: (message) => {
        if (!message.task) return;
        open.task = message.task;
        if (this.open === open) this.renderDetail(message.task);
        // The server ends the watch at a terminal status; do not reconnect after it.
        if (TERMINAL.has(statusOf(message.task))) open.watch.stop();
      },
      onState: (state, error) => {
        if (error && error.httpStatus === 404) {
          open.watch.stop();
          this.actions.notify(error.message);
        }
      },
    });
  }

  renderDetail(task) {
    const status = statusOf(task);
    const reason = pendingReason(task);
    replaceChildren(
      this.elements.detail,
      h(
        "header",
        {},
        h("h2", {}, "Task ", h("code", {}, task.task_id)),
        h("span", { class: `pill status-${status}`, id: "detail-status", dataset: { status } }, status),
        this.actions.allowed() ? this.cancelButton(task, status) : null,
        h("button", { class: "close", onclick: () => this.close() }, "Close"),
      ),
      h(
        "dl",
        { class: "facts" },
        fact("type", task.spec.type),
        fact("priority", task.spec.priority || 0),
        fact("attempts", `${task.attempt_count || 0} (failures ${task.failure_count || 0}, rejections ${task.rejection_count || 0})`),
        fact("created", task.created_at),
        reason ? fact("waiting because", reason) : null,
        task.error && task.error.message ? fact("error", `${task.error.reason}: ${task.error.message}`) : null,
        status === "SUCCEEDED" ? fact("result", JSON.stringify(task.result)) : null,
      ),
      h("h3", {}, "Attempts"),
      timeline(task),
      h(
        "ol",
        { class: "attempts" },
        (task.attempts || []).map((attempt) =>
          h(
            "li",
            { dataset: { attemptStatus: enumName(attempt.status, "ATTEMPT_STATUS_") } },
            `#${attempt.number} on ${attempt.agent_id}: ${enumName(attempt.status, "ATTEMPT_STATUS_")}`,
            attempt.error && attempt.error.message ? ` — ${attempt.error.reason}: ${attempt.error.message}` : "",
          ),
        ),
      ),
    );
  }

  close() {
    if (this.open) this.open.watch.stop();
    this.open = null;
    this.elements.detail.hidden = true;
  }
}

function fact(name, value) {
  return [h("dt", {}, name), h("dd", {}, value)];
}

function currentAttempt(task) {
  return (task.attempts || []).find((attempt) => attempt.attempt_id === task.current_attempt_id);
}

function pendingReason(task) {
  const reason = task.pending_reason;
  if (!reason || !reason.message) return "";
  return reason.message;
}

// The attempts on one time axis, from the task's creation to its end (or now): one bar per attempt
// from assignment to finish, coloured by how it ended.
function timeline(task) {
  const attempts = task.attempts || [];
  const start = millis(task.created_at) || Date.now();
  const end = Math.max(millis(task.finished_at) || Date.now(), start + 1);
  const width = 640;
  const row = 18;
  const chart = svg("svg", { width, height: Math.max(1, attempts.length) * row + 4, class: "timeline" });
  const x = (at) => 4 + ((at - start) / (end - start)) * (width - 8);
  for (const [index, attempt] of attempts.entries()) {
    const from = millis(attempt.assigned_at) || start;
    const to = millis(attempt.finished_at) || end;
    const status = enumName(attempt.status, "ATTEMPT_STATUS_");
    const bar = svg("rect", {
      x: x(from),
      y: index * row + 2,
      width: Math.max(3, x(to) - x(from)),
      height: row - 6,
      class: `attempt attempt-${status}`,
    });
    const title = svg("title", {});
    title.textContent = `#${attempt.number} ${status} on ${attempt.agent_id}, ${((to - from) / 1000).toFixed(2)} s`;
    bar.append(title);
    chart.append(bar);
  }
  return chart;
}

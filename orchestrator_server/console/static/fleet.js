// Fleet view: every agent by type, kept live by the WatchAgents stream (GET /discovery/watch):
// a snapshot, then one delta per change. Transitions for the fleet sparkline come from
// WatchAgentHealth (GET /health/watch); last beat and load, which change on every heartbeat and
// so are not streamed, are refreshed from GET /health/agents every few seconds.

import { ago, enumName, h, replaceChildren, sparkline } from "./dom.js";

const STATUSES = ["READY", "DEGRADED", "DRAINING", "DOWN"];
const LEVEL = { READY: 1, DEGRADED: 0.66, DRAINING: 0.33, DOWN: 0 };
const HISTORY_MS = 10 * 60 * 1000;
const BUCKET_MS = 10 * 1000;
const FLEET_WINDOW_MS = 5 * 60 * 1000;

const statusOf = (agent) => enumName(agent.status, "AGENT_STATUS_");

export class Fleet {
  constructor({ groups, counts, spark, actions }) {
    this.groupsElement = groups;
    this.countsElement = counts;
    this.sparkElement = spark;
    this.actions = actions; // {allowed(): bool, drain(agent), undrain(agent)}
    this.agents = new Map(); // agent id -> Agent (proto3 JSON)
    this.history = new Map(); // agent id -> [{at, status}], for the row sparkline
    this.rendered = new Map(); // agent id -> {status, at}: when the page first showed that status
    this.transitions = []; // times of the status transitions seen live, for the fleet sparkline
    this.scheduled = false;
  }

  // -- WatchAgents -------------------------------------------------------------------------------

  onAgentsMessage(message) {
    if (message.resync) {
      // Our revision is older than the server keeps: what we hold may have missed changes.
      // Drop it; the snapshot that follows is the truth.
      this.agents.clear();
    } else if (message.snapshot) {
      this.agents.clear();
      for (const agent of message.snapshot.agents || []) this.put(agent);
    } else if (message.delta) {
      const { agent, type } = message.delta;
      if (type === "EVENT_TYPE_AGENT_DEREGISTERED" || message.delta.left_query) {
        this.agents.delete(agent.agent_id);
        this.history.delete(agent.agent_id);
      } else {
        this.put(agent);
      }
    }
    this.schedule();
  }

  put(agent) {
    const status = statusOf(agent);
    const steps = this.history.get(agent.agent_id) || [];
    if (!steps.length || steps[steps.length - 1].status !== status) steps.push({ at: Date.now(), status });
    this.history.set(agent.agent_id, steps);
    this.agents.set(agent.agent_id, agent);
  }

  // -- WatchAgentHealth --------------------------------------------------------------------------

  onHealthMessage(message) {
    if (message.resync) this.transitions = [];
    // The initial state and the caught-up marker are not transitions.
    if (message.health && !message.initial && !message.caught_up) this.transitions.push(Date.now());
    this.schedule();
  }

  // -- polled ------------------------------------------------------------------------------------

  mergeHealth(list) {
    for (const health of list) {
      const agent = this.agents.get(health.agent_id);
      if (!agent) continue;
      agent.last_heartbeat_at = health.last_heartbeat_at;
      agent.load = health.load;
    }
    this.schedule();
  }

  forget() {
    this.agents.clear();
    this.history.clear();
    this.transitions = [];
    this.schedule();
  }

  // -- rendering ---------------------------------------------------------------------------------

  schedule() {
    if (this.scheduled) return;
    this.scheduled = true;
    // Coalesces a burst of deltas into one render, in the same turn of the event loop.
    setTimeout(() => {
      this.scheduled = false;
      this.render();
    }, 0);
  }

  render() {
    const now = Date.now();
    const byType = new Map();
    const counts = Object.fromEntries(STATUSES.map((status) => [status, 0]));
    for (const agent of this.agents.values()) {
      const status = statusOf(agent);
      if (status in counts) counts[status] += 1;
      if (!byType.has(agent.type)) byType.set(agent.type, []);
      byType.get(agent.type).push(agent);
    }
    replaceChildren(
      this.countsElement,
      STATUSES.map((status) =>
        h("span", { class: `count status-${status}`, dataset: { status } }, h("b", {}, counts[status]), ` ${status}`),
      ),
    );
    replaceChildren(this.sparkElement, this.fleetSparkline(now));
    const types = [...byType.keys()].sort();
    if (!types.length) {
      replaceChildren(this.groupsElement, h("p", { class: "empty" }, "No agents registered."));
      return;
    }
    replaceChildren(
      this.groupsElement,
      types.map((type) => this.renderGroup(type, byType.get(type), now)),
    );
  }

  fleetSparkline(now) {
    this.transitions = this.transitions.filter((at) => now - at < FLEET_WINDOW_MS);
    const buckets = new Array(FLEET_WINDOW_MS / BUCKET_MS).fill(0);
    for (const at of this.transitions) {
      const index = buckets.length - 1 - Math.floor((now - at) / BUCKET_MS);
      if (index >= 0) buckets[index] += 1;
    }
    const highest = Math.max(1, ...buckets);
    const points = buckets.map((count, index) => [index / (buckets.length - 1), count / highest]);
    const spark = sparkline(points, { width: 180, height: 28 });
    spark.append(document.createElementNS("http://www.w3.org/2000/svg", "title"));
    spark.lastChild.textContent = `${this.transitions.length} transitions in the last 5 min`;
    return spark;
  }

  renderGroup(type, agents, now) {
    agents.sort((a, b) => `${a.name}/${a.instance_id}`.localeCompare(`${b.name}/${b.instance_id}`));
    const canAct = this.actions.allowed();
    return h(
      "section",
      { class: "agent-group", dataset: { type } },
      h("h2", {}, type, h("span", { class: "badge" }, agents.length)),
      h(
        "table",
        { class: "grid agents" },
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            ["agent", "status", "load", "last beat", "flaps", "labels", "history", canAct ? "actions" : null].map(
              (title) => title && h("th", {}, title),
            ),
          ),
        ),
        h("tbody", {}, agents.map((agent) => this.renderRow(agent, now, canAct))),
      ),
    );
  }

  renderRow(agent, now, canAct) {
    const status = statusOf(agent);
    const seen = this.rendered.get(agent.agent_id);
    if (!seen || seen.status !== status) this.rendered.set(agent.agent_id, { status, at: now });
    const capacity = agent.max_concurrent_tasks || 0;
    const active = (agent.load && agent.load.active_tasks) || 0;
    const share = capacity ? Math.min(1, active / capacity) : 0;
    const labels = Object.entries(agent.labels || {}).sort();
    return h(
      "tr",
      {
        dataset: {
          agentId: agent.agent_id,
          status,
          // When this page first drew the current status (epoch ms): what the browser tests time.
          statusShownAt: String(this.rendered.get(agent.agent_id).at),
        },
      },
      h("td", {}, h("b", {}, agent.name), ` / ${agent.instance_id}`, h("div", { class: "muted" }, agent.agent_id)),
      h(
        "td",
        {},
        h("span", { class: `pill status-${status}` }, status),
        agent.status_reason ? h("div", { class: "muted" }, agent.status_reason) : null,
      ),
      h(
        "td",
        { title: `cpu ${agent.load ? agent.load.cpu : 0}, memory ${agent.load ? agent.load.memory : 0}` },
        loadBar(share),
        ` ${active} / ${capacity}`,
      ),
      h("td", { title: agent.last_heartbeat_at || "" }, ago(agent.last_heartbeat_at, now)),
      h("td", { class: "number" }, Number(agent.transitions || 0)),
      h("td", {}, labels.map(([key, value]) => h("span", { class: "chip" }, `${key}=${value}`))),
      h("td", {}, this.rowSparkline(agent.agent_id, now)),
      canAct ? h("td", {}, this.actionButton(agent, status)) : null,
    );
  }

  // The agent's status over the last 10 minutes as a step line (READY high, DOWN at the bottom).
  rowSparkline(agentId, now) {
    const steps = (this.history.get(agentId) || []).filter(
      (step, index, all) => index === all.length - 1 || all[index + 1].at > now - HISTORY_MS,
    );
    this.history.set(agentId, steps);
    const start = now - HISTORY_MS;
    const points = [];
    for (const [index, step] of steps.entries()) {
      const x = Math.max(0, (step.at - start) / HISTORY_MS);
      if (index > 0) points.push([x, LEVEL[steps[index - 1].status] ?? 0]);
      points.push([x, LEVEL[step.status] ?? 0]);
    }
    if (points.length) points.push([1, points[points.length - 1][1]]);
    return sparkline(points, { width: 90, height: 18 });
  }

  actionButton(agent, status) {
    if (agent.draining) {
      return h("button", { class: "action undrain", onclick: () => this.actions.undrain(agent) }, "Undrain");
    }
    if (status === "DOWN") return null;
    return h("button", { class: "action drain", onclick: () => this.actions.drain(agent) }, "Drain");
  }
}

function loadBar(share) {
  const fill = h("span");
  // Through the CSSOM: the page's Content-Security-Policy refuses inline style attributes.
  fill.style.width = `${(share * 100).toFixed(0)}%`;
  return h("span", { class: "bar" }, fill);
}

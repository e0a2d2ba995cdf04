// Health view and the failover banner: GET /health/system (GetSystemHealth) and GET /readyz.

import { duration, enumName, h, replaceChildren } from "./dom.js";
import * as api from "./api.js";

async function readiness() {
  // /readyz is an operation of the gateway, not an RPC: it needs no key and answers 503 with a
  // reason when the server is not serving.
  try {
    const response = await fetch("/readyz", { cache: "no-store" });
    const body = await response.json();
    return body.reason ? `${body.status}: ${body.reason}` : body.status;
  } catch (error) {
    return `unreachable (${error.message})`;
  }
}

export async function refreshHealth(list, banner) {
  const [system, ready] = await Promise.all([api.get("/health/system"), readiness()]);
  banner.hidden = !system.failover_paused;
  banner.textContent = system.failover_paused
    ? `Failover paused: ${system.failover_paused_reason || "many agents dropped at once"}. Tasks of the lost agents are held, not moved.`
    : "";
  const byStatus = (system.agents_by_status || []).map(
    (entry) => `${enumName(entry.status, "AGENT_STATUS_")} ${entry.count}`,
  );
  const facts = [
    ["status", system.status, "system-status"],
    ["version", system.version, "version"],
    ["uptime", duration(system.uptime), "uptime"],
    ["store", system.store_status, "store-status"],
    ["readiness (/readyz)", ready, "readiness"],
    ["agents", `${system.total_agents} — ${byStatus.join(", ")}`, "agents"],
    ["tasks pending", system.pending_tasks, "pending"],
    ["tasks running", system.running_tasks, "running"],
    ["failover", system.failover_paused ? `paused: ${system.failover_paused_reason}` : "active", "failover"],
    ["revision", system.revision, "revision"],
  ];
  replaceChildren(
    list,
    facts.map(([name, value, key]) => [h("dt", {}, name), h("dd", { dataset: { fact: key } }, value)]),
  );
  return system;
}

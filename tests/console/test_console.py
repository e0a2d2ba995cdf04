"""The operator console at /ui, driven in headless Chromium against a real server and real agents.

Every wait is a deadline on an observed state (the page's DOM, or the server over gRPC); none is a
fixed sleep. The screenshots of docs/console/ are taken here.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from orchestrator.v1 import agent_pb2, health_pb2, health_pb2_grpc, registry_pb2, task_pb2, tasks_pb2
from tests.conftest import ServerProcess
from tests.console.conftest import (
    ADMIN_KEY,
    BEARER_ADMIN,
    READER_KEY,
    AgentProcesses,
    Stubs,
    screenshot,
    until,
)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def fleet(agents: AgentProcesses) -> dict[str, str]:
    """Two agents that live for the whole module: names -> ids."""
    return {
        "alpha": agents.start("alpha", "--label", "zone=a", "--label", "tier=gold"),
        "gamma": agents.start("gamma", "--type", "indexer", "--label", "zone=b"),
    }


# -- page helpers ----------------------------------------------------------------------------------


def base_url(server: ServerProcess) -> str:
    return f"http://127.0.0.1:{server.http_port}"


def use_key(driver: Any, server: ServerProcess, key: str, role: str) -> None:
    """Opens the console and enters `key` in the page; waits until the page settled the role."""
    from selenium.webdriver.common.by import By

    driver.get(f"{base_url(server)}/ui/")
    field = driver.find_element(By.ID, "key-input")
    field.clear()
    field.send_keys(key)
    driver.find_element(By.ID, "key-save").click()
    until(lambda: driver.find_element(By.ID, "role").text == role, what=f"role {role!r} on the page")
    assert key not in driver.current_url


def show(driver: Any, view: str) -> None:
    driver.execute_script("location.hash = arguments[0]", view)


def agent_row(driver: Any, agent_id: str) -> dict[str, str] | None:
    """The fleet row of an agent as its data attributes, or None while it is not drawn."""
    result: dict[str, str] | None = driver.execute_script(
        "const row = document.querySelector(`tr[data-agent-id='${arguments[0]}']`);"
        "return row ? {...row.dataset} : null;",
        agent_id,
    )
    return result


def row_status(driver: Any, agent_id: str) -> str:
    row = agent_row(driver, agent_id)
    return row["status"] if row else ""


def click(driver: Any, selector: str) -> None:
    """Clicks the element once it is drawn; found and clicked in one script, since the page redraws
    its tables as data arrives (a found element may be replaced before a separate click)."""
    until(
        lambda: driver.execute_script(
            "const e = document.querySelector(arguments[0]); if (e) e.click(); return Boolean(e);", selector
        ),
        what=f"{selector} on the page",
    )


def page_errors(driver: Any) -> list[str]:
    """Uncaught errors and policy violations the page logged (refused calls are expected)."""
    entries = driver.get_log("browser")
    return [
        entry["message"]
        for entry in entries
        if entry["level"] == "SEVERE" and "Failed to load resource" not in entry["message"]
    ]


def fill_task_form(driver: Any, **fields: str) -> str:
    """Fills and submits "Create a task"; returns the created task id ("" if refused)."""
    from selenium.webdriver.common.by import By

    form = driver.find_element(By.ID, "create-task")
    driver.execute_script("arguments[0].reset()", form)
    for name, value in fields.items():
        element = form.find_element(By.NAME, name)
        element.clear()
        element.send_keys(value)
    driver.execute_script("document.getElementById('create-result').dataset.taskId = 'waiting'")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    task_id: str = until(
        lambda: driver.execute_script(
            "const id = document.getElementById('create-result').dataset.taskId;"
            "return id === 'waiting' ? null : (id || 'refused');"
        ),
        what="the form's answer",
    )
    return "" if task_id == "refused" else task_id


def get_task(stubs: Stubs, task_id: str) -> task_pb2.Task:
    task: task_pb2.Task = stubs.tasks.GetTask(
        tasks_pb2.GetTaskRequest(task_id=task_id), metadata=BEARER_ADMIN
    ).task
    return task


# -- the tests -------------------------------------------------------------------------------------


def test_the_page_is_served_with_a_strict_policy(console_server: ServerProcess) -> None:
    with urllib.request.urlopen(f"{base_url(console_server)}/ui/") as answer:
        assert answer.headers["Content-Type"].startswith("text/html")
        assert "script-src 'self'" in answer.headers["Content-Security-Policy"]
        assert b'src="app.js"' in answer.read()
    with urllib.request.urlopen(f"{base_url(console_server)}/ui") as answer:
        assert answer.url.endswith("/ui/")  # redirected, so the page's relative URLs resolve
    with urllib.request.urlopen(f"{base_url(console_server)}/ui/app.js") as answer:
        assert answer.headers["Content-Type"].startswith("text/javascript")
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"{base_url(console_server)}/ui/..%2fconftest.py")
    assert missing.value.code == 404


def test_fleet_is_live_and_a_killed_agent_is_down_on_the_page_within_a_second(
    browser: Any, console_server: ServerProcess, agents: AgentProcesses, fleet: dict[str, str], stubs: Stubs
) -> None:
    use_key(browser, console_server, ADMIN_KEY, "may act")
    victim = agents.start("victim", "--label", "zone=c")
    # Registered after the page opened: it arrives through the watch, not a reload.
    until(lambda: row_status(browser, victim) == "READY", what="the new agent READY on the page")
    for agent_id in fleet.values():
        assert row_status(browser, agent_id) == "READY"
    # Killed while it holds a task: an unplanned drop, which in this small fleet pauses failover.
    held = stubs.tasks.CreateTask(
        tasks_pb2.CreateTaskRequest(spec=task_pb2.TaskSpec(type="hold", target_agent_id=victim)),
        metadata=BEARER_ADMIN,
    ).task.task_id
    until(lambda: get_task(stubs, held).status == task_pb2.TASK_STATUS_RUNNING, what="the held task RUNNING")

    killed_at = time.time()
    agents.kill("victim")
    until(lambda: row_status(browser, victim) == "DOWN", what="the killed agent DOWN on the page")
    row = agent_row(browser, victim)
    assert row is not None
    latency = int(row["statusShownAt"]) / 1000 - killed_at
    print(f"SIGKILL -> DOWN drawn on the page: {latency * 1000:.0f} ms")
    assert latency < 1.0, f"DOWN shown {latency:.2f} s after the kill"

    counts = browser.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('.count')]"
        ".map((c) => [c.dataset.status, Number(c.querySelector('b').textContent)]))"
    )
    assert counts["DOWN"] >= 1 and counts["READY"] >= 2
    # The drop paused failover (the server's MASS_FAILURE_* settings): the banner says so.
    until(
        lambda: browser.execute_script("return !document.getElementById('failover-banner').hidden"),
        what="the failover-paused banner",
    )
    assert page_errors(browser) == []
    screenshot(browser, "fleet")


def test_drain_and_undrain_from_the_page(
    browser: Any, console_server: ServerProcess, agents: AgentProcesses, stubs: Stubs
) -> None:
    drainee = agents.start("drainee", "--type", "reporter")

    def agent() -> agent_pb2.Agent:
        request = registry_pb2.GetAgentRequest(agent_id=drainee)
        return stubs.registry.GetAgent(request, metadata=BEARER_ADMIN).agent

    until(lambda: agent().status == agent_pb2.AGENT_STATUS_READY, what="the drainee READY over gRPC")
    assert not agent().draining
    use_key(browser, console_server, ADMIN_KEY, "may act")
    click(browser, f"tr[data-agent-id='{drainee}'] button.drain")

    drained = until(
        lambda: (found := agent()).status == agent_pb2.AGENT_STATUS_DRAINING and found,
        what="DRAINING over gRPC",
    )
    # The page's button drained it, with the page's reason, through the API.
    assert drained.draining
    assert drained.status_reason == "drained from the console"
    until(lambda: row_status(browser, drainee) == "DRAINING", what="DRAINING on the page")
    click(browser, f"tr[data-agent-id='{drainee}'] button.undrain")
    until(lambda: agent().status == agent_pb2.AGENT_STATUS_READY, what="READY again over gRPC")
    assert not agent().draining
    until(lambda: row_status(browser, drainee) == "READY", what="READY again on the page")
    # Ready again, the row offers to drain it once more.
    until(
        lambda: browser.execute_script(
            "return Boolean(document.querySelector(arguments[0]))",
            f"tr[data-agent-id='{drainee}'] button.drain",
        ),
        what="the Drain button back on the page",
    )


def test_a_reader_key_sees_everything_and_no_action(
    browser: Any, console_server: ServerProcess, fleet: dict[str, str], stubs: Stubs
) -> None:
    from selenium.webdriver.common.by import By

    stubs.tasks.CreateTask(
        tasks_pb2.CreateTaskRequest(spec=task_pb2.TaskSpec(type="echo")), metadata=BEARER_ADMIN
    )
    use_key(browser, console_server, READER_KEY, "read only")
    until(lambda: row_status(browser, fleet["alpha"]) == "READY", what="the fleet for a reader")
    show(browser, "#tasks")
    until(lambda: browser.find_elements(By.CSS_SELECTOR, "#recent-tasks tr[data-task-id]"), what="tasks")
    assert browser.find_elements(By.CSS_SELECTOR, "button.action") == []
    assert not browser.find_element(By.ID, "create-task").is_displayed()
    # The key is only in this tab's session storage and the request header, nowhere else.
    assert browser.execute_script("return localStorage.length") == 0
    assert READER_KEY not in browser.current_url

    use_key(browser, console_server, "not-a-key-0123456789abc", "key refused")
    assert browser.find_elements(By.CSS_SELECTOR, "button.action") == []
    show(browser, "#fleet")


def test_a_task_created_in_the_form_is_run_by_an_agent(
    browser: Any, console_server: ServerProcess, fleet: dict[str, str], stubs: Stubs
) -> None:
    use_key(browser, console_server, ADMIN_KEY, "may act")
    show(browser, "#tasks")
    task_id = fill_task_form(browser, type="echo", payload='{"from": "the console"}')
    assert task_id
    until(
        lambda: browser.execute_script(
            "const s = document.getElementById('detail-status'); return s && s.dataset.status === 'SUCCEEDED'"
        ),
        what="SUCCEEDED in the task's detail",
    )
    task = get_task(stubs, task_id)
    assert task.status == task_pb2.TASK_STATUS_SUCCEEDED
    assert dict(task.result) == {"from": "the console"}
    assert task.attempts[0].agent_id == fleet["alpha"]
    until(
        lambda: browser.execute_script(
            "const r = document.querySelector(`#recent-tasks tr[data-task-id='${arguments[0]}']`);"
            "return r && r.dataset.status === 'SUCCEEDED'",
            task_id,
        ),
        what="SUCCEEDED in the recent tasks",
    )


def test_failures_pending_reasons_and_refusals_on_the_tasks_view(
    browser: Any, console_server: ServerProcess, fleet: dict[str, str], stubs: Stubs
) -> None:
    from selenium.webdriver.common.by import By

    use_key(browser, console_server, ADMIN_KEY, "may act")
    show(browser, "#tasks")

    # A refused action shows the server's own message.
    refused = urllib.request.Request(
        f"{base_url(console_server)}/tasks/create",
        data=json.dumps({"spec": {"type": "echo", "label_selector": "zone in (("}}).encode(),
        headers={"x-api-key": ADMIN_KEY},
    )
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(refused)
    server_message = json.loads(answer.value.read())["error"]["message"]
    assert fill_task_form(browser, type="echo", label_selector="zone in ((") == ""
    notice = browser.find_element(By.ID, "notice").text
    assert server_message in notice and "INVALID_ARGUMENT" in notice

    # A task nobody can take waits, and the page says why.
    waiting = fill_task_form(browser, type="echo", required_capabilities="gpu")
    reason = until(lambda: get_task(stubs, waiting).pending_reason.message, what="a pending reason")
    until(
        lambda: (
            reason
            in browser.execute_script(
                "const r = document.querySelector(`#pending-tasks tr[data-task-id='${arguments[0]}']`);"
                "return r ? r.textContent : ''",
                waiting,
            )
        ),
        what="the pending reason on the page",
    )
    depth = browser.find_element(By.CSS_SELECTOR, "#queue-depth tr[data-priority='0'] td.number").text
    assert int(depth) >= 1
    click(browser, f"#pending-tasks tr[data-task-id='{waiting}'] button.cancel")
    until(
        lambda: get_task(stubs, waiting).status == task_pb2.TASK_STATUS_CANCELLED, what="CANCELLED over gRPC"
    )

    # A failing task: each attempt on the timeline, and the failure with its reason.
    failing = fill_task_form(browser, type="fail", max_attempts="2")
    until(
        lambda: browser.execute_script(
            "const s = document.getElementById('detail-status'); return s && s.dataset.status === 'FAILED'"
        ),
        what="FAILED in the task's detail",
    )
    until(
        lambda: len(browser.find_elements(By.CSS_SELECTOR, "#task-detail svg.timeline rect")) == 2,
        what="two attempts on the timeline",
    )
    until(
        lambda: (
            "CONSOLE_TEST"
            in browser.execute_script(
                "const r = document.querySelector(`#failed-tasks tr[data-task-id='${arguments[0]}']`);"
                "return r ? r.textContent : ''",
                failing,
            )
        ),
        what="the failure's reason in recent failures",
    )
    # One task left waiting, for the screenshot.
    stubs.tasks.CreateTask(
        tasks_pb2.CreateTaskRequest(
            spec=task_pb2.TaskSpec(type="echo", priority=5, required_capabilities=["gpu"])
        ),
        metadata=BEARER_ADMIN,
    )
    until(
        lambda: browser.find_elements(By.CSS_SELECTOR, "#queue-depth tr[data-priority='5']"),
        what="the waiting task in the queue",
    )
    browser.execute_script(
        "document.getElementById('notice').hidden = true; document.getElementById('create-task').reset()"
    )
    screenshot(browser, "tasks")


def test_health_view(browser: Any, console_server: ServerProcess, grpc_channel: Any) -> None:
    use_key(browser, console_server, READER_KEY, "read only")
    show(browser, "#health")
    system = health_pb2_grpc.HealthServiceStub(grpc_channel).GetSystemHealth(
        health_pb2.GetSystemHealthRequest(), metadata=BEARER_ADMIN
    )

    def fact(name: str) -> str:
        text: str = browser.execute_script(
            "const f = document.querySelector(`[data-fact='${arguments[0]}']`); return f ? f.textContent : ''",
            name,
        )
        return text

    until(lambda: fact("version") == system.version, what="the version")
    assert fact("store-status") == system.store_status
    assert fact("readiness") == "SERVING"
    assert fact("uptime").endswith(" s")
    screenshot(browser, "health")


def test_a_resync_notice_drops_the_fleet_and_the_snapshot_after_it_rebuilds_it(
    browser: Any, console_server: ServerProcess
) -> None:
    """The page's handling of WatchAgents' resync answer, fed to its fleet module in the browser
    (a server only answers resync for a revision older than its retained log)."""
    use_key(browser, console_server, READER_KEY, "read only")
    rows = browser.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        const { Fleet } = await import("/ui/fleet.js");
        const [groups, counts, spark] = [1, 2, 3].map(() => document.createElement("div"));
        const fleet = new Fleet({ groups, counts, spark, actions: { allowed: () => false } });
        const agent = (id, status) => ({ agent_id: id, name: id, instance_id: "1", type: "t", status });
        const drawn = () => new Promise((resolve) => setTimeout(
          () => resolve([...groups.querySelectorAll("tr[data-agent-id]")].map((r) => r.dataset.agentId)), 10));
        fleet.onAgentsMessage({ revision: "5", snapshot: { agents: [agent("a", "AGENT_STATUS_READY"), agent("b", "AGENT_STATUS_READY")] } });
        const before = await drawn();
        fleet.onAgentsMessage({ revision: "9", resync: { oldest_revision: "7", reason: "compacted" } });
        const during = await drawn();
        fleet.onAgentsMessage({ revision: "12", snapshot: { agents: [agent("b", "AGENT_STATUS_DOWN")] } });
        const after = await drawn();
        done({ before, during, after });
        """
    )
    assert rows == {"before": ["a", "b"], "during": [], "after": ["b"]}


def test_the_live_view_resumes_after_the_server_restarts(
    browser: Any, console_server: ServerProcess, fleet: dict[str, str], stubs: Stubs
) -> None:
    use_key(browser, console_server, ADMIN_KEY, "may act")
    until(lambda: row_status(browser, fleet["alpha"]) == "READY", what="the fleet")

    def stream_state() -> dict[str, str]:
        state: dict[str, str] = browser.execute_script(
            "return {...document.getElementById('stream-state').dataset}"
        )
        return state

    before = int(stream_state().get("reconnects", "0"))
    console_server.env["PORT"] = str(console_server.http_port)  # the page's origin must stay
    console_server.terminate()
    console_server.start()
    until(lambda: int(stream_state().get("reconnects", "0")) > before, what="the page noticing the drop")
    until(lambda: stream_state().get("state") == "live", timeout=30, what="the watch live again")
    # It asked to resume after the last revision it had seen, not for a new snapshot.
    assert int(stream_state()["resumedFrom"]) > 0

    def alpha_ready() -> bool:
        agent = stubs.agent_by_name("alpha")
        return agent is not None and agent.status == agent_pb2.AGENT_STATUS_READY

    until(alpha_ready, timeout=30, what="alpha back on the restarted server")
    # A change made after the restart reaches the page through the resumed watch.
    stubs.registry.DrainAgent(registry_pb2.DrainAgentRequest(agent_id=fleet["alpha"]), metadata=BEARER_ADMIN)
    until(lambda: row_status(browser, fleet["alpha"]) == "DRAINING", what="DRAINING after the restart")
    stubs.registry.UndrainAgent(
        registry_pb2.UndrainAgentRequest(agent_id=fleet["alpha"]), metadata=BEARER_ADMIN
    )
    until(lambda: row_status(browser, fleet["alpha"]) == "READY", what="READY after the restart")


def test_the_keys_typed_in_the_page_never_reach_the_server_log(console_server: ServerProcess) -> None:
    """Runs after the others: every key the page sent, in every log line the server wrote."""
    logs = "".join(path.read_text(errors="replace") for path in console_server.workdir.glob("server-*.log"))
    assert "console-role-probe" in logs  # the role probes were audited...
    for key in (ADMIN_KEY, READER_KEY, "not-a-key-0123456789abc"):
        assert key not in logs  # ...without the keys that made them

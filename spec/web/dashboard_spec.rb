# frozen_string_literal: true

require "spec_helper"

# The dashboard in a real headless Chromium, against a real PostgreSQL, with
# tasks created through TaskerCore and their steps run through the store's
# own claim/apply functions (StoreHelpers), as the orchestration loop does.
RSpec.describe "TaskerCore::Web dashboard", :db, :web do
  let(:diamond) { template("diamond", [step("a"), step("b", ["a"]), step("c", ["a"]), step("d", %w[b c])]) }
  let(:single) { template("single", [step("only")], namespace: "billing") }

  before { use_templates(diamond, single) }

  def create(name = "diamond", **opts) = TaskerCore.create_task(name: name, namespace: opts.delete(:namespace) || "default", **opts)

  # Runs the claimed steps of every task: names in fail fail for good, the rest complete.
  def run_steps(fail: [], output: ->(row) { { "from" => row["step_name"] } })
    TaskerCore::Store.with_connection do |c|
      loop do
        rows = claim(c)
        break if rows.empty?

        bad, good = rows.partition { |r| fail.include?(r["step_name"]) }
        succeed(c, good, output: output) unless good.empty?
        fail_steps(c, bad, retryable: false) unless bad.empty?
      end
    end
  end

  def db_step(task_id, name) = TaskerCore::Store.with_connection { |c| step_row(c, task_id, name) }
  def db_task_state(task_id) = TaskerCore::Store.with_connection { |c| task_state(c, task_id) }

  it "shows the overview: throughput, tasks by state, depth, live workers and recent failures" do
    2.times { create }
    failing = create
    run_steps(fail: ["c"])
    billing = create("single", namespace: "billing")
    TaskerCore.configure(env: "test", overrides: { recurring: [{ name: "hourly_bill", task: "single", namespace: "billing",
                                                                  cron: "@hourly" }, { name: "nightly", task: "single",
                                                                                       namespace: "billing", cron: "0 3 * * *" }] })
    TaskerCore::Tasks.create_tasks(%w[ReportJob ReportJob Admin::MailJob].each_with_index.map do |klass, i|
      { name: "perform", namespace: "active_job", version: "1", context: { "job_class" => klass },
        identity_key: "active_job/#{klass}/job-#{i}/0" }
    end, templates: TaskerCore::JobAdapter.templates)
    TaskerCore::Store.with_connection do |c|
      c.exec("INSERT INTO tasker_recurring_schedules (name, last_tick_at, last_task_id) VALUES ('hourly_bill', '2026-01-02T03:00:00Z', $1)",
             [billing])
      c.exec(<<~SQL)
        SELECT tasker_upsert_workers('orch-test', ARRAY['worker-1'], ARRAY['host-a'], ARRAY[4242], ARRAY[8], ARRAY[3],
                                     ARRAY[extract(epoch FROM now())::float8], ARRAY[2], ARRAY[1], ARRAY['connected'],
                                     ARRAY[extract(epoch FROM now())::float8])
      SQL
    end

    visit
    screenshot("overview")
    by_state = @browser.css("#tasks-by-state .card").to_h { |n| [n.attribute("data-state"), n.at_css(".n").text.to_i] }
    expect(by_state).to include("complete" => 0, "error" => 3, "pending" => 4) # the billing task and 3 jobs
    expect(@browser.at_css("#ready-depth").text.to_i).to eq(4) # the billing task's step and the 3 jobs' steps
    expect(@browser.at_css("#throughput-chart")).not_to be_nil
    expect(@browser.at_css("#throughput-now").text).to match(%r{last minute: \d+\.\d\d steps/s})
    worker = @browser.at_css('tr[data-worker-id="worker-1"]').text
    expect(worker).to include("host-a", "4242", "2 / 1", "connected")
    expect(texts("#failures td").join(" ")).to include("c", "diamond ##{failing}", "RuntimeError: boom")
    hourly = @browser.at_css('#recurring tr[data-schedule="hourly_bill"]')
    expect(hourly.text).to include("billing/single", "@hourly", "2026-01-02T03:00:00Z")
    expect(hourly.at_css("a").attribute("href")).to end_with("/tasks/#{billing}")
    expect(@browser.at_css('#recurring tr[data-schedule="nightly"]').text).to include("0 3 * * *", "none yet")
    jobs = @browser.css("#jobs tr[data-job-class]").to_h { |n| [[n.attribute("data-job-class"), n.attribute("data-state")], n.css("td").last.text.to_i] }
    expect(jobs).to eq(%w[ReportJob pending] => 2, %w[Admin::MailJob pending] => 1)
  end

  it "shows each step's queue, and a queues table naming the queues with ready steps and no worker" do
    use_templates(diamond, single, template("routed", [step("x", queue: "py", priority: 5), step("y", ["x"])]))
    routed = create("routed")
    create
    TaskerCore::Store.with_connection do |c|
      c.exec(<<~SQL)
        SELECT tasker_upsert_workers('orch-test', ARRAY['worker-1'], ARRAY['host-a'], ARRAY[4242], ARRAY[8], ARRAY[0],
                                     ARRAY[extract(epoch FROM now())::float8], ARRAY[1], ARRAY[0], ARRAY['connected'],
                                     ARRAY[extract(epoch FROM now())::float8], ARRAY['default,api'])
      SQL
    end

    visit("workers")
    screenshot("queues")
    rows = @browser.css("table.queues tr[data-queue]").to_h { |r| [r.attribute("data-queue"), r.css("td").map(&:text)] }
    expect(rows.keys).to eq(%w[api default py])
    expect(rows["py"]).to eq(["py", "1", "0", "0", "-", "0 (no worker serves it)", "0"])
    expect(rows["default"]).to eq(%w[default 1 0 0 - 1 8])
    expect(@browser.at_css('tr[data-queue="py"]').attribute("class")).to eq("unserved")
    expect(@browser.at_css('tr[data-worker-id="worker-1"]').text).to include("default, api")

    visit("tasks/#{routed}")
    expect(@browser.at_css('.step[data-step-name="x"] .queue').text).to eq("py")
    expect(@browser.at_css('.step[data-step-name="x"]').text).to include("priority 5")
    expect(@browser.at_css('.step[data-step-name="y"] .queue').text).to eq("default")
  end

  it "lists tasks with filters and pages through them" do
    old = create(identity_key: "order-old")
    TaskerCore::Store.with_connection do |c|
      c.exec("UPDATE tasker_tasks SET created_at = '2020-01-02T00:00:00Z' WHERE id = $1", [old])
    end
    erred = create(identity_key: "order-7")
    run_steps(fail: ["a"])
    billing = create("single", namespace: "billing", identity_key: "invoice-1")
    many = Array.new(52) { create }

    visit("tasks")
    expect(@browser.css("tr.task-row").size).to eq(50)
    expect(@browser.css("tr.task-row").first.attribute("data-task-id").to_i).to eq(many.last)
    click_and_wait("#next-page")
    expect(@browser.css("tr.task-row").map { |r| r.attribute("data-task-id").to_i }).to eq(([billing, erred, old] + many.first(2)).sort.reverse)

    visit("tasks")
    @browser.at_css("select[name=state]").select("error")
    click_and_wait("#task-filters button")
    expect(@browser.current_url).to include("state=error")
    expect(@browser.css("tr.task-row").map { |r| r.attribute("data-task-id").to_i }).to eq([erred, old])

    visit("tasks?namespace=billing&name=single")
    expect(@browser.css("tr.task-row").map { |r| r.attribute("data-task-id").to_i }).to eq([billing])
    visit("tasks?identity_key=order-7")
    expect(@browser.css("tr.task-row").map { |r| r.attribute("data-task-id").to_i }).to eq([erred])
    visit("tasks?created_to=2021-01-01")
    expect(@browser.css("tr.task-row").map { |r| r.attribute("data-task-id").to_i }).to eq([old])
    visit("tasks?created_from=2021-01-01&state=error")
    expect(@browser.css("tr.task-row").map { |r| r.attribute("data-task-id").to_i }).to eq([erred])
  end

  it "draws the task's DAG, one node per step in its state, and shows attempts, errors and outputs" do
    id = create(context: { "order_id" => 42 })
    run_steps(fail: ["c"])

    visit("tasks/#{id}")
    screenshot("task")
    nodes = @browser.css("svg.dag g.dag-node").to_h { |n| [n.attribute("data-step-name"), n.attribute("data-state")] }
    states = TaskerCore::Store.with_connection do |c|
      c.exec("SELECT name, state FROM tasker_workflow_steps WHERE task_id = $1", [id]).to_h { |r| [r["name"], r["state"]] }
    end
    expect(nodes).to eq(states)
    expect(nodes).to eq("a" => "complete", "b" => "complete", "c" => "error", "d" => "pending")
    step_ids = TaskerCore::Store.with_connection do |c|
      c.exec("SELECT name, id FROM tasker_workflow_steps WHERE task_id = $1", [id]).to_h { |r| [r["id"], r["name"]] }
    end
    edges = @browser.css("svg.dag path.dag-edge").map { |e| [step_ids[e.attribute("data-from").to_i], step_ids[e.attribute("data-to").to_i]] }
    expect(edges).to contain_exactly(%w[a b], %w[a c], %w[b d], %w[c d])

    c_step = @browser.at_css('.step[data-step-name="c"]')
    expect(c_step.at_css(".step-error").text).to start_with("RuntimeError: boom")
    expect(c_step.css("table.attempts tr").size).to eq(2) # header + one attempt
    expect(c_step.at_css("table.attempts").text).to include("failed", "orch-1")
    expect(@browser.at_css('.step[data-step-name="a"] .step-output').text).to include('"from": "a"')
    expect(@browser.at_css("#task-context").text).to include('"order_id": 42')
  end

  it "retries a failed step, resolves a step with an output, retries every failed step and cancels a task" do
    id = create
    run_steps(fail: ["a"])
    expect(db_step(id, "a")["state"]).to eq("error")

    visit("tasks/#{id}")
    click_and_wait('.step[data-step-name="a"] button.retry-step')
    expect(@browser.at_css("#notice").text).to eq("step #{db_step(id, 'a')['id']} retried")
    expect(db_step(id, "a")["state"]).to eq("pending")

    @browser.at_css('.step[data-step-name="a"] details summary').click
    textarea = @browser.at_css('.step[data-step-name="a"] form.resolve textarea')
    textarea.focus
    @browser.evaluate(%(document.querySelector('.step[data-step-name="a"] form.resolve textarea').value = '{"by": "hand", "n": 7}'))
    click_and_wait('.step[data-step-name="a"] button.resolve-step')
    a = db_step(id, "a")
    expect(a["state"]).to eq("resolved_manually")
    expect(TaskerCore::Codec.unpack(a["output"])).to eq("by" => "hand", "n" => 7)

    run_steps(fail: %w[b c])
    expect(%w[b c].map { |n| db_step(id, n)["state"] }).to eq(%w[error error])
    visit("tasks/#{id}")
    click_and_wait("#retry-failed")
    expect(@browser.at_css("#notice").text).to eq("2 failed steps of task #{id} retried")
    expect(%w[b c].map { |n| db_step(id, n)["state"] }).to eq(%w[pending pending])

    click_and_wait("#cancel-task")
    expect(db_task_state(id)).to eq("cancelled")
    expect(@browser.at_css("#task-state").text).to eq("cancelled")
  end

  it "shows hostile task data as text and runs none of it; binary outputs are shown as bytes" do
    hostile = %(<script>window.__pwned = 1</script><img src=x onerror=window.__pwned=2>)
    id = create(context: { "note" => hostile }, identity_key: hostile)
    run_steps(output: ->(row) { row["step_name"] == "b" ? { "blob" => "\x00\xFF\xFEbinary".b } : { "html" => hostile } })

    visit("tasks/#{id}")
    expect(@browser.evaluate("window.__pwned")).to be_nil
    expect(@browser.at_css("#task-context").text).to include(hostile)
    expect(@browser.at_css('.step[data-step-name="a"] .step-output').text).to include(hostile)
    expect(@browser.at_css("#identity-key").text).to eq(hostile)
    expect(@browser.at_css('.step[data-step-name="b"] .step-output').text).to include("<9 bytes: 00 ff fe 62 69")
    expect(@browser.css("script").size).to eq(1) # the dashboard's own
    expect(@browser.css("img").size).to eq(0)

    visit("tasks?identity_key=#{CGI.escape(hostile)}")
    expect(@browser.evaluate("window.__pwned")).to be_nil
    expect(@browser.css("tr.task-row td")[4].text).to eq(hostile)
  end

  it "refuses a POST without the page's CSRF token or from another origin" do
    id = create
    expect(http_post("tasks/#{id}/cancel", {}).code).to eq("403")
    visit("tasks/#{id}")
    token = @browser.at_css("input[name=authenticity_token]").attribute("value")
    cookie = @browser.cookies["tasker_web_csrf"].value
    forged = http_post("tasks/#{id}/cancel", { "authenticity_token" => token },
                       "Cookie" => "tasker_web_csrf=#{cookie}", "Origin" => "http://evil.example")
    expect(forged.code).to eq("403")
    expect(forged.body).to include("cross-origin")
    expect(db_task_state(id)).to eq("pending")
    ok = http_post("tasks/#{id}/cancel", { "authenticity_token" => token }, "Cookie" => "tasker_web_csrf=#{cookie}")
    expect(ok.code).to eq("303")
    expect(db_task_state(id)).to eq("cancelled")
  end

  it "serves Prometheus metrics: step counters, depth, tasks and workers" do
    http_get("metrics") # the step counters count from the first scrape
    3.times { create }
    run_steps(fail: ["c"])
    body = http_get("metrics").tap { |r| expect(r["content-type"]).to start_with("text/plain; version=0.0.4") }.body
    expect(body).to include("# TYPE tasker_steps_completed_total counter",
                            "# TYPE tasker_step_claim_to_complete_seconds histogram")
    expect(body).to match(/^tasker_steps_completed_total\{namespace="default",template="diamond",step="a"\} [1-9]/)
    expect(body).to match(/^tasker_steps_failed_total\{namespace="default",template="diamond",step="c"\} [1-9]/)
    expect(body).to include(%(tasker_tasks{state="error"} 3), "tasker_steps_ready 0", "tasker_steps_in_flight 0",
                            "tasker_workers_live 0")
    expect(body).not_to include("tasker_messages_refused_total") # no orchestration loop in this process
    expect(body.lines.grep_v(/\A#/).map { |l| l.split.last }).to all(match(/\A[-+]?(\d+(\.\d+)?(e[-+]?\d+)?|Inf|NaN)\z/))
  end
end

RSpec.describe "TaskerCore::Web read-only", :db, :web, web_app: { read_only: true } do
  before { use_templates(template("diamond", [step("a"), step("b", ["a"])])) }

  it "shows no action and refuses them" do
    id = TaskerCore.create_task(name: "diamond")
    visit("tasks/#{id}")
    expect(@browser.at_css("header .ro").text).to eq("read-only")
    expect(@browser.css("form[method=post]")).to be_empty
    expect(http_post("tasks/#{id}/cancel", {}).code).to eq("403")
    expect(TaskerCore::Store.with_connection { |c| task_state(c, id) }).to eq("pending")
  end
end

# frozen_string_literal: true

require "spec_helper"
require "net/http"
require "tasker_core/web"
require "tasker_core/web/server"

# /metrics over real HTTP (the dashboard in a WEBrick server in this
# process), against a real PostgreSQL whose steps move through the store's
# own claim/apply/retry functions. The step counters are the process's
# totals since its first scrape, so each example compares two scrapes.
RSpec.describe "TaskerCore::Web /metrics step counters", :db do
  before(:context) { @server = TaskerCore::Web::Server.new(TaskerCore::Web.new, port: 0).start }
  after(:context) { @server&.stop }

  let(:diamond) { template("diamond", [step("a"), step("b", ["a"]), step("c", ["a"]), step("d", %w[b c])]) }
  let(:single) { template("single", [step("only")], namespace: "billing") }

  before { use_templates(diamond, single) }

  # { "name{labels}" => value } of every sample.
  def scrape
    res = Net::HTTP.get_response(URI("#{@server.url}/metrics"))
    expect(res.code).to eq("200")
    res.body.lines.grep_v(/\A#/).to_h do |line|
      key, value = line.strip.split(/ (?=\S+\z)/)
      [key, Float(value)]
    end
  end

  def counter(samples, name, step, template: "diamond", namespace: "default", le: nil)
    labels = %(namespace="#{namespace}",template="#{template}",step="#{step}")
    labels += %(,le="#{le}") if le
    samples.fetch("#{name}{#{labels}}", 0.0)
  end

  def delta(before, after, name, step, **opts) = counter(after, name, step, **opts) - counter(before, name, step, **opts)

  def counters(samples) = samples.select { |k, _| k.match?(/\Atasker_step(s_\w+_total|_claim_to_complete_seconds_\w+)\{/) }

  # Every counter sample of later is at least its value in earlier.
  def expect_no_decrease(earlier, later)
    counters(earlier).each do |key, value|
      expect(later.fetch(key, -1)).to be >= value, "#{key} went from #{value} to #{later[key].inspect}"
    end
  end

  def create(name = "diamond", namespace: "default") = TaskerCore.create_task(name: name, namespace: namespace)

  def run_steps(conn, fail: [])
    loop do
      rows = claim(conn)
      break if rows.empty?

      bad, good = rows.partition { |r| fail.include?(r["step_name"]) }
      succeed(conn, good) unless good.empty?
      fail_steps(conn, bad, retryable: false) unless bad.empty?
    end
  end

  it "adds exactly the steps completed and failed between two scrapes, also while scraped concurrently" do
    before = scrape
    3.times { create }
    TaskerCore::Store.with_connection { |c| run_steps(c, fail: ["c"]) }
    after = scrape
    expect(delta(before, after, "tasker_steps_completed_total", "a")).to eq(3)
    expect(delta(before, after, "tasker_steps_completed_total", "b")).to eq(3)
    expect(delta(before, after, "tasker_steps_completed_total", "c")).to eq(0)
    expect(delta(before, after, "tasker_steps_failed_total", "c")).to eq(3)
    expect(delta(before, after, "tasker_steps_completed_total", "d")).to eq(0) # waits on c
    expect(delta(before, after, "tasker_step_claim_to_complete_seconds_count", "b")).to eq(3)
    expect(delta(before, after, "tasker_step_claim_to_complete_seconds_bucket", "b", le: "+Inf")).to eq(3)
    expect(delta(before, after, "tasker_step_claim_to_complete_seconds_bucket", "b", le: "300")).to eq(3)
    expect(after["tasker_step_transitions_behind"]).to eq(0)
    expect_no_decrease(before, after)

    # Four threads scrape while twenty single-step tasks complete one by one:
    # each thread sees the counter only go up, and the end is exact.
    seen = Array.new(4) { [] }
    done = false
    scrapers = seen.map do |mine|
      Thread.new do
        mine << counter(scrape, "tasker_steps_completed_total", "only", template: "single", namespace: "billing") until done
      end
    end
    TaskerCore::Store.with_connection do |c|
      20.times do
        create("single", namespace: "billing")
        run_steps(c)
      end
    end
    done = true
    scrapers.each(&:join)
    last = scrape
    expect(delta(after, last, "tasker_steps_completed_total", "only", template: "single", namespace: "billing")).to eq(20)
    seen.each { |values| expect(values).to eq(values.sort) }
    expect_no_decrease(after, last)
  end

  it "never goes down when a failed step is retried or its task deleted" do
    id = create
    c_step = nil
    TaskerCore::Store.with_connection do |c|
      run_steps(c, fail: ["c"])
      c_step = step_row(c, id, "c")
    end
    failed = scrape
    expect(TaskerCore.retry_step(c_step["id"])).to be(true) # error -> pending: no longer a step in error
    retried = scrape
    expect_no_decrease(failed, retried)
    expect(delta(failed, retried, "tasker_steps_failed_total", "c")).to eq(0)
    expect(delta(failed, retried, "tasker_steps_retried_total", "c")).to eq(0) # not claimed again yet

    TaskerCore::Store.with_connection { |c| run_steps(c) } # c's second attempt, then d
    done = scrape
    expect_no_decrease(retried, done)
    expect(delta(retried, done, "tasker_steps_retried_total", "c")).to eq(1)
    expect(delta(retried, done, "tasker_steps_completed_total", "c")).to eq(1)
    expect(delta(retried, done, "tasker_steps_completed_total", "d")).to eq(1)
    expect(delta(failed, done, "tasker_steps_failed_total", "c")).to eq(0)

    # Deleting the finished task and its rows (as retention will) takes nothing away.
    TaskerCore::Store.with_connection do |c|
      %w[tasker_workflow_step_transitions tasker_workflow_steps tasker_task_transitions].each do |table|
        c.exec("DELETE FROM #{table} WHERE task_id = $1", [id])
      end
      c.exec("DELETE FROM tasker_tasks WHERE id = $1", [id])
    end
    deleted = scrape
    expect(counters(deleted)).to eq(counters(done))
  end

  it "counts a transition whose transaction commits after a later one's" do
    2.times { create("single", namespace: "billing") }
    before = scrape
    slow = connect
    slow.exec("BEGIN")
    succeed(slow, claim(slow, limit: 1)) # logged first (lower ids), not committed
    TaskerCore::Store.with_connection { |c| succeed(c, claim(c, limit: 1)) } # the other step, committed
    middle = scrape
    expect(delta(before, middle, "tasker_steps_completed_total", "only", template: "single", namespace: "billing")).to eq(1)
    slow.exec("COMMIT")
    after = scrape
    expect(delta(before, after, "tasker_steps_completed_total", "only", template: "single", namespace: "billing")).to eq(2)
    expect(delta(middle, scrape, "tasker_steps_completed_total", "only", template: "single", namespace: "billing")).to eq(1)
  end
end

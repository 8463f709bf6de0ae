# frozen_string_literal: true

require "open3"
require "json"
require "rbconfig"

# The ActiveJob adapter's enqueue side with each ActiveJob installed on the
# machine (this bundle has none): a plain Ruby process per version loads that
# activejob and the checkout's lib/, enqueues jobs into the spec database with
# perform_later, set(wait:, priority:, queue:), perform_all_later (7.1+) or
# enqueue_all (7.0), and a queue name tasker_core refuses; the tasks and steps
# it wrote are read here. examples/rails_app's spec runs jobs through workers.
module ActiveJobAdapterSpec
  ROOT = File.expand_path("../..", __dir__)
  # The machine's activejob versions (Bundler hides gems outside the bundle from Gem::Specification).
  VERSIONS = Gem.path.flat_map { |dir| Dir[File.join(dir, "specifications", "activejob-*.gemspec")] }
                .filter_map { |f| File.basename(f, ".gemspec")[/\Aactivejob-(\d+(?:\.\d+)*)\z/, 1] }
                .uniq.sort_by { |v| Gem::Version.new(v) }

  SCRIPT = <<~'RUBY'
    gem "activejob", ENV.fetch("AJ_VERSION")
    require "logger" # concurrent-ruby 1.3.5+ no longer loads it; ActiveSupport 7.0 assumes it
    require "json"
    require "active_job/queue_adapters/tasker_core_adapter"
    ActiveJob::Base.logger = Logger.new(nil)
    ActiveJob::Base.queue_adapter = :tasker_core

    class ReportJob < ActiveJob::Base
      def perform(*) = nil
    end

    def failure(job)
      e = job.enqueue_error
      e && { "class" => e.class.name, "cause" => e.cause&.class&.name, "message" => e.message }
    end

    adapter = ActiveJob::Base.queue_adapter
    out = { "activejob" => ActiveJob.version.to_s, "adapter" => adapter.class.name,
            "superclass" => adapter.class.superclass.name, "enqueued_at" => Time.now.to_f }
    if ENV["ONLY_ONE"]
      job = nil
      out["result"] = ReportJob.perform_later(9) { |j| job = j }.class.name
      out["failure"] = failure(job)
      puts JSON.generate(out)
      exit
    end

    out["plain"] = ReportJob.perform_later(1).provider_job_id
    out["later"] = ReportJob.set(wait: 600, priority: 5, queue: "reports").perform_later(2).provider_job_id
    out["until"] = ReportJob.set(wait_until: Time.at(out["enqueued_at"] + 900)).perform_later(8).provider_job_id

    bad = ReportJob.new(3)
    out["bad_result"] = bad.enqueue(queue: "low priority") # what perform_later returns
    out["bad"] = failure(bad)
    out["bad_job_id"] = bad.job_id

    # perform_all_later (7.1+) or the adapter's enqueue_all (7.0): the jobs' own
    # scheduled_at (a Float in 7.0, a Time from 7.1) is their run_at.
    all = [ReportJob.new(4), ReportJob.new(5).set(wait: 600, queue: "reports")]
    out["all_via"] = ActiveJob.respond_to?(:perform_all_later) ? "perform_all_later" : "enqueue_all"
    out["all_result"] = ActiveJob.respond_to?(:perform_all_later) ? ActiveJob.perform_all_later(all) : adapter.enqueue_all(all)
    out["all"] = all.map(&:provider_job_id)
    out["all_enqueued"] = all.map { |j| j.respond_to?(:successfully_enqueued?) ? j.successfully_enqueued? : nil }

    # One refused job: the one statement writes none of them.
    mixed = [ReportJob.new(6), ReportJob.new(7).set(queue: "low priority")]
    out["mixed_result"] = ActiveJob.respond_to?(:perform_all_later) ? ActiveJob.perform_all_later(mixed) : adapter.enqueue_all(mixed)
    out["mixed"] = mixed.map { |j| [j.provider_job_id, j.successfully_enqueued?, failure(j)] }
    out["mixed_job_ids"] = mixed.map(&:job_id)
    puts JSON.generate(out)
  RUBY
end

RSpec.describe "ActiveJob::QueueAdapters::TaskerCoreAdapter", :db do
  # Runs the script with activejob `version`: the machine's gems, not this bundle.
  def run_script(version, env = {})
    out, err, status = Bundler.with_unbundled_env do
      Open3.capture3({ "AJ_VERSION" => version, "DATABASE_URL" => db_url, "TASKER_CONFIG_PATH" => nil,
                       "TASKER_ENV" => nil, "RAILS_ENV" => nil, "RACK_ENV" => nil }.merge(env),
                     RbConfig.ruby, "-I", File.join(ActiveJobAdapterSpec::ROOT, "lib"), "-e", ActiveJobAdapterSpec::SCRIPT,
                     chdir: ActiveJobAdapterSpec::ROOT)
    end
    expect(status).to be_success, "activejob #{version}:\n#{out}\n#{err}"
    JSON.parse(out.lines.last)
  end

  def steps_of(ids)
    TaskerCore::Store.with_connection do |c|
      c.exec(<<~SQL, ["{#{ids.join(',')}}"]).to_h { |r| [r["task_id"], r] }
        SELECT s.task_id, s.queue, s.priority, extract(epoch FROM s.next_attempt_at)::float8 AS run_at, t.identity_key
          FROM tasker_workflow_steps s JOIN tasker_tasks t ON t.id = s.task_id WHERE s.task_id = ANY($1::bigint[])
      SQL
    end
  end

  def jobs_with_ids(job_ids)
    TaskerCore::Store.with_connection do |c|
      c.exec("SELECT count(*)::int AS n FROM tasker_tasks WHERE namespace = 'active_job' AND split_part(identity_key, '/', 3) = ANY($1::text[])",
             ["{#{job_ids.join(',')}}"]).first["n"]
    end
  end

  it "finds an installed activejob to run with" do
    expect(ActiveJobAdapterSpec::VERSIONS).not_to be_empty
  end

  ActiveJobAdapterSpec::VERSIONS.each do |version|
    it "enqueues with activejob #{version}: queue, priority, wait, all at once, and refusals as ActiveJob::EnqueueError" do
      r = run_script(version)
      expect(r["activejob"]).to eq(version)
      expect(r["adapter"]).to eq("ActiveJob::QueueAdapters::TaskerCoreAdapter")
      abstract = Gem::Version.new(version) >= Gem::Version.new("7.2") ? "ActiveJob::QueueAdapters::AbstractAdapter" : "Object"
      expect(r["superclass"]).to eq(abstract)
      enqueued_at = r["enqueued_at"]

      steps = steps_of([r["plain"], r["later"], r["until"], *r["all"]])
      expect(steps.fetch(r["plain"])).to include("queue" => "default", "priority" => 0)
      expect(steps.fetch(r["plain"])["identity_key"]).to match(%r{\Aactive_job/ReportJob/[0-9a-f-]{36}/0\z})
      expect(steps.fetch(r["plain"])["run_at"]).to be < enqueued_at + 60
      expect(steps.fetch(r["later"])).to include("queue" => "reports", "priority" => -5)
      expect(steps.fetch(r["later"])["run_at"]).to be_between(enqueued_at + 599, enqueued_at + 660)
      expect(steps.fetch(r["until"])["run_at"]).to be_within(0.001).of(enqueued_at + 900)

      expect(r["bad_result"]).to be(false)
      expect(r["bad"]["class"]).to eq("ActiveJob::EnqueueError")
      expect(r["bad"]["cause"]).to eq("TaskerCore::ValidationError")
      expect(r["bad"]["message"]).to include("queue").and include("low priority")
      expect(jobs_with_ids([r["bad_job_id"]])).to eq(0)

      expect(r["all_via"]).to eq(Gem::Version.new(version) >= Gem::Version.new("7.1") ? "perform_all_later" : "enqueue_all")
      expect(r["all_result"]).to eq(r["all_via"] == "enqueue_all" ? 2 : nil) # perform_all_later returns nil
      expect(r["all"]).to all(be_a(Integer))
      expect(r["all_enqueued"]).to eq([true, true])
      first, waiting = r["all"].map { |id| steps.fetch(id) }
      expect(first).to include("queue" => "default")
      expect(first["run_at"]).to be < enqueued_at + 60
      expect(waiting).to include("queue" => "reports")
      expect(waiting["run_at"]).to be_between(enqueued_at + 599, enqueued_at + 660) # the job's scheduled_at

      expect(r["mixed_result"]).to eq(r["all_via"] == "enqueue_all" ? 0 : nil)
      r["mixed"].each do |provider_job_id, enqueued, failure|
        expect([provider_job_id, enqueued]).to eq([nil, false])
        expect(failure).to include("class" => "ActiveJob::EnqueueError", "cause" => "TaskerCore::ValidationError")
      end
      expect(jobs_with_ids(r["mixed_job_ids"])).to eq(0)
    end
  end

  it "raises the database's refusal as ActiveJob::EnqueueError (perform_later returns false)" do
    missing_db = db_url.sub(%r{/[^/?]*(\?|\z)}, "/tasker_no_such_database\\1")
    r = run_script(ActiveJobAdapterSpec::VERSIONS.last, "ONLY_ONE" => "1", "DATABASE_URL" => missing_db)
    expect(r["result"]).to eq("FalseClass")
    expect(r["failure"]["class"]).to eq("ActiveJob::EnqueueError")
    expect(r["failure"]["cause"]).to start_with("TaskerCore::")
    expect(r["failure"]["message"]).to include("tasker_no_such_database")
  end

  it "counts jobs by class and state from the partial index tasker_tasks_active_job" do
    job = ->(klass, n) { { name: "perform", namespace: "active_job", version: "1", context: { "job_class" => klass },
                           identity_key: "active_job/#{klass}/job-#{n}/0" } }
    TaskerCore::Tasks.create_tasks([job.("ReportJob", 1), job.("ReportJob", 2), job.("MailJob", 3)],
                                   templates: TaskerCore::JobAdapter.templates)
    TaskerCore::Store.with_connection do |c|
      expect(TaskerCore::JobAdapter.counts(c)).to eq([{ "job_class" => "ReportJob", "state" => "pending", "count" => 2 },
                                                      { "job_class" => "MailJob", "state" => "pending", "count" => 1 }])
      # A handful of rows is a sequential scan's size; without one the planner must take the index,
      # and can only if the query implies its predicate (namespace = 'active_job').
      c.exec("BEGIN")
      c.exec("SET LOCAL enable_seqscan = off")
      sql = TaskerCore::JobAdapter::COUNTS_SQL
      plan = c.exec("EXPLAIN #{sql}").map { |row| row["QUERY PLAN"] }.join("\n")
      c.exec("ROLLBACK")
      expect(plan).to include("tasker_tasks_active_job")
    end
  end
end

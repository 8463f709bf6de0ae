# frozen_string_literal: true

# Run by `rake rails:fresh_app` as `bin/rails runner script/tasker_check.rb`
# while `bin/tasker orchestrator` and `bin/tasker worker` run: a task created
# in a rolled-back transaction must not exist, one created in a committed
# transaction must complete through them. Prints the outcome as JSON.
require "json"

rolled_back = nil
ActiveRecord::Base.transaction do
  rolled_back = TaskerCore.create_task(name: "widgets", context: { "batch" => "rolled_back" })
  raise ActiveRecord::Rollback
end

committed = nil
ActiveRecord::Base.transaction do
  committed = TaskerCore.create_task(name: "widgets", context: { "batch" => "committed" })
end

task = TaskerCore.wait_for(committed, timeout: 90)
puts JSON.generate(
  "rolled_back_task" => TaskerCore.task(rolled_back),
  "status" => task[:status],
  "steps" => task[:steps].map { |s| s.slice(:name, :state, :attempts, :failures, :error) },
  "widgets" => Widget.where("name LIKE 'committed-%'").count,
  "rolled_back_widgets" => Widget.where("name LIKE 'rolled_back-%'").count
)

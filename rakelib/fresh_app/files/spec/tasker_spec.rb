# frozen_string_literal: true

require "rails_helper"
require "tasker_core/rspec"

# Written into the fresh app by `rake rails:fresh_app`: the rspec kit in an
# ordinary Rails app (rails_helper calls maintain_test_schema!).
RSpec.describe "tasker_core in a Rails app", :tasker_stack do
  it "runs a handler that uses a model in a worker with the app loaded" do
    id = TaskerCore.create_task(name: "widgets", context: { "batch" => "stack" })
    expect(id).to complete_within(60)
    expect(id).to have_step("count").in_state(:complete).with_output("widgets" => 13)
    expect(Widget.where("name LIKE 'stack-%'").count).to eq(13)
  end
end

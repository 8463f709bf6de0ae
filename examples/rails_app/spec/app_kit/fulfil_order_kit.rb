# frozen_string_literal: true

# The app's own workflow spec with tasker_core's rspec kit, as an app's
# spec/ would hold it (rails_app_spec.rb runs it in its own rspec process,
# with RAILS_ENV=test and, to see the kit refuse it, RAILS_ENV=development).
require_relative "../../config/environment"
require "tasker_core/rspec"

RSpec.describe "fulfil_order through the rspec kit" do
  let(:order) do
    { "order_id" => 77, "customer_email" => "kit@example.com",
      "items" => [{ "sku" => "TEA-1", "quantity" => 1, "unit_price_cents" => 450 }] }
  end

  it "runs through a worker with the app loaded, its handler writing a model", :tasker_stack do
    id = TaskerCore.create_task(name: "fulfil_order", namespace: "shop", context: order)
    expect(id).to complete_within(60)
    expect(id).to have_step("reserve_stock").in_state(:complete).with_output(include("warehouse" => "AMS-1"))
    expect(Reservation.find_by(order_id: 77)&.skus).to eq(["TEA-1"])
  end

  it "runs inline in this process", :tasker_inline do
    result = tasker_inline.run(name: "fulfil_order", namespace: "shop", context: order.merge("order_id" => 78))
    expect(result.status).to eq("complete")
    expect(Reservation.find_by(order_id: 78)&.warehouse).to eq("AMS-1")
  end
end

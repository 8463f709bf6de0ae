# frozen_string_literal: true

module Orders
  # Holds the order's stock in the configured warehouse: a Reservation row
  # (ActiveRecord), written once per order however often the step runs.
  # The worker runs each step inside the app's executor, so the connection
  # this takes goes back to the pool when the step ends.
  class ReserveHandler
    def call(task, _sequence, step)
      order_id = task.context["order_id"]
      reservation = Reservation.create_or_find_by!(order_id: order_id) do |r|
        r.warehouse = step.config["warehouse"]
        r.skus = task.context["items"].map { |i| i["sku"] }
      end
      sleep 0.05 # a warehouse call: steps of several orders overlap
      { "reservation_id" => "res-#{order_id}", "warehouse" => reservation.warehouse, "skus" => reservation.skus,
        "reservations" => Reservation.count }
    end
  end
end

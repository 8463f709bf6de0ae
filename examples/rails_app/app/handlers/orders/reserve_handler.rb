# frozen_string_literal: true

module Orders
  # Holds the order's stock in the configured warehouse.
  class ReserveHandler
    def call(task, _sequence, step)
      { "reservation_id" => "res-#{task.context['order_id']}", "warehouse" => step.config["warehouse"],
        "skus" => task.context["items"].map { |i| i["sku"] } }
    end
  end
end

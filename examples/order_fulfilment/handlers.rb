# frozen_string_literal: true

# Step handlers of the order-fulfilment demo (templates/order_fulfilment.yml).
# Load them into a worker: tasker worker --handlers examples/order_fulfilment/handlers.rb
#
# Each handler sleeps handler_config["work_ms"] to stand in for a call to
# another system, and returns a small output the next steps read.
module OrderFulfilment
  def self.simulate_work(step)
    ms = step.config.fetch("work_ms", 0).to_f
    sleep(ms / 1000.0) if ms.positive?
  end

  # Checks the order and prices it.
  class ValidateOrder
    def call(task, _sequence, step)
      order = task.context
      items = order.fetch("items")
      raise TaskerCore::PermanentError, "order #{order['order_id']} has no items" if items.empty?

      OrderFulfilment.simulate_work(step)
      { "order_id" => order["order_id"], "item_count" => items.sum { |i| i["quantity"] },
        "total_cents" => items.sum { |i| i["quantity"] * i["unit_price_cents"] } }
    end
  end

  # Holds the stock for the order's items.
  class ReserveInventory
    def call(task, sequence, step)
      OrderFulfilment.simulate_work(step)
      order_id = sequence["validate_order"].fetch("order_id")
      { "reservation_id" => "res-#{order_id}", "warehouse" => step.config["warehouse"],
        "skus" => task.context["items"].map { |i| i["sku"] } }
    end
  end

  # Takes the payment. The gateway times out on the first attempt for one
  # order in flaky_every: a RetryableError, so the step is tried again.
  class ChargePayment
    def call(task, sequence, step)
      OrderFulfilment.simulate_work(step)
      order_id = task.context["order_id"]
      every = step.config.fetch("flaky_every", 0).to_i
      if every.positive? && (order_id % every).zero? && step.attempt == 1
        raise TaskerCore::RetryableError.new("payment gateway timed out for order #{order_id}", retry_after: 0.05)
      end

      { "charge_id" => "ch-#{order_id}-#{step.attempt}", "amount_cents" => sequence["validate_order"]["total_cents"],
        "currency" => step.config["currency"], "attempt" => step.attempt }
    end
  end

  # Books the parcel once stock is held and the money taken.
  class ShipOrder
    def call(task, sequence, step)
      reservation = sequence.fetch("reserve_inventory")
      charge = sequence.fetch("charge_payment")
      OrderFulfilment.simulate_work(step)
      { "tracking_number" => format("%s-%08d", step.config["carrier"], task.context["order_id"]),
        "reservation_id" => reservation["reservation_id"], "charge_id" => charge["charge_id"] }
    end
  end

  # Tells the customer where the parcel is.
  class NotifyCustomer
    def call(task, sequence, step)
      OrderFulfilment.simulate_work(step)
      { "emailed" => task.context["customer_email"], "tracking_number" => sequence["ship_order"]["tracking_number"] }
    end
  end
end

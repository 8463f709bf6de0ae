# frozen_string_literal: true

module Orders
  # Totals the order. A step handler's #call(task, sequence, step) returns the
  # step's output; sequence holds the outputs of the steps it depends on.
  class PriceHandler
    def call(task, _sequence, _step)
      items = task.context.fetch("items")
      raise TaskerCore::PermanentError, "order #{task.context['order_id']} has no items" if items.empty?

      { "total_cents" => items.sum { |i| i["quantity"] * i["unit_price_cents"] },
        "item_count" => items.sum { |i| i["quantity"] } }
    end
  end
end

# frozen_string_literal: true

module Orders
  # Charges the priced total. A gateway time-out would raise
  # TaskerCore::RetryableError and the step would be tried again (retry: in
  # config/tasks/fulfil_order.yml).
  class ChargeHandler
    def call(task, sequence, step)
      { "charge_id" => "ch-#{task.context['order_id']}-#{step.attempt}",
        "amount_cents" => sequence["price_order"].fetch("total_cents"), "currency" => step.config["currency"] }
    end
  end
end

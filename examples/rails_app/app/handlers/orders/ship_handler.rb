# frozen_string_literal: true

module Orders
  # Ships once the stock is held and the card charged.
  class ShipHandler
    def call(task, sequence, _step)
      { "tracking" => "TRK-#{task.context['order_id']}", "reservation_id" => sequence["reserve_stock"]["reservation_id"],
        "charge_id" => sequence["charge_card"]["charge_id"] }
    end
  end
end

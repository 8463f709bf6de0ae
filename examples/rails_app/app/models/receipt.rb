# frozen_string_literal: true

# A receipt sent for an order by OrderReceiptJob (an ActiveJob job on tasker_core).
class Receipt < ApplicationRecord
end

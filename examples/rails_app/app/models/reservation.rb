# frozen_string_literal: true

# Stock set aside for an order by the reserve_stock step (Orders::ReserveHandler).
class Reservation < ApplicationRecord
end

# frozen_string_literal: true

class CreateReservations < ActiveRecord::Migration[7.0]
  def change
    create_table :reservations do |t|
      t.integer :order_id, null: false, index: { unique: true }
      t.string :warehouse, null: false
      t.string :skus, array: true, null: false, default: []
      t.timestamps
    end
  end
end
